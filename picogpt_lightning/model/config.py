"""PicoGPTConfig: every size and switch of the model, validated where it is made."""

from dataclasses import asdict, dataclass, fields
from typing import Optional

from picogpt_lightning.model.rope import check_rope_scaling

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant.bitnet import BITNET_KINDS

MLP_KINDS = ("swiglu", "gelu")
LINEAR_KINDS = ("linear", *BITNET_KINDS)  # nn.Linear, or BitNet's BitLinear (1.58-bit or 1-bit weights)


@dataclass
class PicoGPTConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_embd: int = 384
    n_head: int = 6
    n_query_groups: Optional[int] = None  # None: one key/value head per query head (plain MHA)
    mlp: str = "swiglu"
    intermediate_size: Optional[int] = None  # None: 4 * n_embd (gelu) or llama's 8/3 * n_embd rounded (swiglu)
    tie_weights: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    bias: bool = False  # biases on every projection (attention's q, k, v and output; the MLP's unless mlp_bias)
    mlp_bias: Optional[bool] = None  # None: as bias; llama's attention_bias and mlp_bias may differ
    head_dim: Optional[int] = None  # None: n_embd / n_head; llama and mistral may set it apart from the width
    # RoPE frequencies rescaled for longer contexts, as transformers' rope_parameters: None (plain),
    # {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (model/rope.py)
    rope_scaling: Optional[dict] = None
    neftune_noise_alpha: float = 0.0
    linear: str = "linear"  # the blocks' projections: "linear", "bitnet1.58" or "bitnet1" (BitLinear)
    # SubLN (BitNet Distillation): an RMSNorm before attention's output projection and the MLP's down
    # projection, which steadies the activations a low-bit projection quantizes
    sub_norm: bool = False

    def __post_init__(self):
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_query_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"PicoGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise UserError(f"PicoGPTConfig.head_dim must be a positive integer or None (n_embd / n_head), got {self.head_dim!r}")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise UserError(
                f"PicoGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "pick n_head among the divisors of n_embd"
            )
        if self.n_head % self.n_query_groups != 0:
            raise UserError(
                f"PicoGPTConfig.n_head ({self.n_head}) must be divisible by n_query_groups "
                f"({self.n_query_groups}); pick a divisor of n_head"
            )
        if self.head_size % 2 != 0:
            raise UserError(
                f"PicoGPTConfig head size {self.head_size} (head_dim, or n_embd/n_head) must be even for rotary "
                "embeddings; change head_dim, n_embd or n_head"
            )
        if self.mlp not in MLP_KINDS:
            raise UserError(f"PicoGPTConfig.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.linear not in LINEAR_KINDS:
            raise UserError(f"PicoGPTConfig.linear must be one of {LINEAR_KINDS}, got {self.linear!r}")
        if not isinstance(self.sub_norm, bool):
            raise UserError(f"PicoGPTConfig.sub_norm must be true or false, got {self.sub_norm!r}")
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.n_embd, self.mlp)
        elif not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0:
            raise UserError(
                f"PicoGPTConfig.intermediate_size must be a positive integer, got {self.intermediate_size!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"PicoGPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.rope_theta <= 0:
            raise UserError(f"PicoGPTConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if self.norm_eps <= 0:
            raise UserError(f"PicoGPTConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if self.mlp_bias is None:
            self.mlp_bias = self.bias
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.neftune_noise_alpha < 0:
            raise UserError(
                f"PicoGPTConfig.neftune_noise_alpha must be >= 0 (0 turns NEFTune off), "
                f"got {self.neftune_noise_alpha!r}"
            )

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PicoGPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"PicoGPTConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def default_intermediate_size(n_embd: int, mlp: str) -> int:
    if mlp == "gelu":
        return 4 * n_embd
    # llama: two thirds of 4 * n_embd (SwiGLU has three matrices), rounded up to a multiple of 64
    hidden = int(2 * 4 * n_embd / 3)
    return 64 * ((hidden + 63) // 64)

