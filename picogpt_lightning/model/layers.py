"""The pieces of a llama-like block besides attention: projections, SubLN norms, dropout, MLPs."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.quant.bitnet import BitLinear


def make_linear(config: PicoGPTConfig, in_features: int, out_features: int, bias: Optional[bool] = None) -> nn.Module:
    """The one place a projection is built, so the linear kind can be switched by config (bias: config.bias)."""
    bias = config.bias if bias is None else bias
    if config.linear == "linear":
        return nn.Linear(in_features, out_features, bias=bias)
    return BitLinear(in_features, out_features, bias=bias, kind=config.linear)


def make_sub_norm(config: PicoGPTConfig, width: int):
    """SubLN's RMSNorm before an output projection, or None when config.sub_norm is off (no key, no call)."""
    return nn.RMSNorm(width, eps=config.norm_eps) if config.sub_norm else None


def make_dropout(p: float) -> nn.Module:
    # no dropout module at all when p == 0: one call less per use in every decoding step
    return nn.Dropout(p) if p > 0 else nn.Identity()


class SwiGLU(nn.Module):
    """llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.gate_proj = make_linear(config, config.n_embd, config.intermediate_size, config.mlp_bias)
        self.up_proj = make_linear(config, config.n_embd, config.intermediate_size, config.mlp_bias)
        self.sub_norm = make_sub_norm(config, config.intermediate_size)
        self.down_proj = make_linear(config, config.intermediate_size, config.n_embd, config.mlp_bias)
        self.down_proj.is_residual_projection = True
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.sub_norm is not None:
            hidden = self.sub_norm(hidden)
        return self.dropout(self.down_proj(hidden))


class GeluMLP(nn.Module):
    """GPT-2's MLP: proj(gelu(fc(x)))."""

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.fc = make_linear(config, config.n_embd, config.intermediate_size, config.mlp_bias)
        self.sub_norm = make_sub_norm(config, config.intermediate_size)
        self.proj = make_linear(config, config.intermediate_size, config.n_embd, config.mlp_bias)
        self.proj.is_residual_projection = True
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc(x))
        if self.sub_norm is not None:
            hidden = self.sub_norm(hidden)
        return self.dropout(self.proj(hidden))
