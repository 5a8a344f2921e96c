"""The pieces of a llama-like block: rotary embeddings, grouped-query attention, MLPs."""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from picogpt_lightning.model.cache import StaticLayerCache
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.quant.bitnet import BitLinear

KVCache = Tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, n_query_groups, T_past, head_size)


def make_linear(config: PicoGPTConfig, in_features: int, out_features: int) -> nn.Module:
    """The one place a projection is built, so the linear kind can be switched by config."""
    if config.linear == "linear":
        return nn.Linear(in_features, out_features, bias=config.bias)
    return BitLinear(in_features, out_features, bias=config.bias, kind=config.linear)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings in the transformers (rotate-half) layout.

    The frequencies are no buffer: `.to(torch.bfloat16)` (bf16-true, a bf16 `from_hf`) would cast a
    buffer and cost the angles 0.1 rad by position 255. Recomputed in float32 at each call from
    two numbers, they stay exact whatever the module's dtype; it is a few dozen values.
    """

    def __init__(self, head_size: int, theta: float):
        super().__init__()
        self.head_size = head_size
        self.theta = theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_size, 2, dtype=torch.float32, device=device) / self.head_size
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every angle, shaped (B, 1, T, head_size) to broadcast over heads."""
        # float32 for the angles: positions times frequencies lose digits in half precision
        freqs = position_ids[:, None, :, None].float() * self.inv_freq(position_ids.device)  # (B, 1, T, hs / 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_size); cos, sin: (B, 1, T, head_size) from RotaryEmbedding."""
    if cos.dtype != x.dtype:  # under autocast the projections come out in the compute dtype
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def make_dropout(p: float) -> nn.Module:
    # no dropout module at all when p == 0: one call less per use in every decoding step
    return nn.Dropout(p) if p > 0 else nn.Identity()


def build_attention_mask(
    attention_mask: Optional[torch.Tensor], query_len: int, past_len: int, device: torch.device
) -> Optional[torch.Tensor]:
    """A boolean (B, 1, T_q, T_k) mask, True = may attend: causal and not a pad key.

    Without `attention_mask` (no padding) returns None when SDPA's own causal flag (no
    cache) or no mask at all (one cached query) is exact, so it can take its fastest path.
    A given mask is always applied, built with tensor ops only: asking whether it is all
    ones would stall the GPU and break a compiled graph, so callers that know there is no
    padding pass None (the collator and generate do). Every query may always see itself,
    so a pad query whose keys are all pads (left padding) gets a finite output instead
    of NaN; real tokens never read pad positions, so that choice reaches no real output.
    """
    no_padding = attention_mask is None
    if no_padding and (past_len == 0 or query_len == 1):
        return None
    key_len = past_len + query_len
    query_pos = torch.arange(past_len, key_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    causal = key_pos <= query_pos  # (T_q, T_k)
    if no_padding:
        return causal[None, None]
    keep = attention_mask[:, None, None, :key_len].bool()  # (B, 1, 1, T_k)
    own_position = key_pos == query_pos
    return (causal & keep) | own_position


class CausalSelfAttention(nn.Module):
    """Grouped-query attention through SDPA, with rotary embeddings and an optional KV cache.

    The cache is either the growing kind, a (keys, values) tuple that this call extends and
    returns, or a layer of a `StaticKVCache`, written in place at `cache_position`.
    """

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_query_groups = config.n_query_groups
        self.head_size = config.head_size
        self.dropout = config.dropout
        qkv_width = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = make_linear(config, config.n_embd, qkv_width)  # one matmul for q, k and v
        self.proj = make_linear(config, config.n_head * config.head_size, config.n_embd)
        self.proj.is_residual_projection = True
        self.resid_dropout = make_dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        past_key_value: Optional[Union[KVCache, StaticLayerCache]] = None,
        use_cache: bool = False,
        cache_position: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[KVCache]]:
        B, T, _ = x.shape
        H, G = self.n_head, self.n_query_groups
        # the fused projection's rows are [H query heads | G key heads | G value heads]
        heads = self.qkv(x).view(B, T, H + 2 * G, self.head_size).transpose(1, 2)
        rotated = apply_rotary(heads[:, : H + G], cos, sin)  # queries and keys in one pass
        q, k, v = rotated[:, :H], rotated[:, H:], heads[:, H + G :]

        if isinstance(past_key_value, StaticLayerCache):
            k, v = past_key_value.update(k, v, cache_position)  # the whole buffers; the mask hides unwritten ones
            present = None  # the static cache holds them already
        else:
            if past_key_value is not None:
                k = torch.cat((past_key_value[0], k), dim=2)
                v = torch.cat((past_key_value[1], v), dim=2)
            present = (k, v) if use_cache else None

        # without a mask, queries of a cached step see every past key: causal only matters without a cache
        is_causal = mask is None and past_key_value is None and T > 1
        # enable_gqa: each key/value head serves n_head / n_query_groups consecutive query heads
        # (transformers' repeat_kv layout) without copying keys and values per query head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
            enable_gqa=self.n_query_groups != self.n_head,
        )
        y = y.transpose(1, 2).reshape(B, T, H * self.head_size)
        return self.resid_dropout(self.proj(y)), present


class SwiGLU(nn.Module):
    """llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.gate_proj = make_linear(config, config.n_embd, config.intermediate_size)
        self.up_proj = make_linear(config, config.n_embd, config.intermediate_size)
        self.down_proj = make_linear(config, config.intermediate_size, config.n_embd)
        self.down_proj.is_residual_projection = True
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class GeluMLP(nn.Module):
    """GPT-2's MLP: proj(gelu(fc(x)))."""

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.fc = make_linear(config, config.n_embd, config.intermediate_size)
        self.proj = make_linear(config, config.intermediate_size, config.n_embd)
        self.proj.is_residual_projection = True
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)

    def forward(self, x, cos, sin, mask, past_key_value=None, use_cache=False, cache_position=None):
        attn_out, present = self.attn(self.attn_norm(x), cos, sin, mask, past_key_value, use_cache, cache_position)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, present
