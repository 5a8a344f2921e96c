"""Rotary embeddings and grouped-query attention over any KV cache."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.layers import make_dropout, make_linear, make_sub_norm
from picogpt_lightning.model.rope import inverse_frequencies


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings in the transformers (rotate-half) layout.

    The frequencies are no buffer: `.to(torch.bfloat16)` (bf16-true, a bf16 `from_hf`) would cast a
    buffer and cost the angles 0.1 rad by position 255. Recomputed in float32 at each call from
    two numbers, they stay exact whatever the module's dtype; it is a few dozen values.
    """

    def __init__(self, head_size: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        self.head_size = head_size
        self.theta = theta
        self.scaling = scaling  # None, or a checked rope_scaling (model/rope.py)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        return inverse_frequencies(self.head_size, self.theta, self.scaling, device)

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


class CausalSelfAttention(nn.Module):
    """Grouped-query attention through SDPA, with rotary embeddings and an optional KV cache.

    `cache` is one layer of any `picogpt_lightning.model.cache.KVCache`: its update stores the
    new keys and values and returns those to attend over; the mask (from `model.masks`) says
    which of them each query may see.
    """

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_query_groups = config.n_query_groups
        self.head_size = config.head_size
        self.dropout = config.dropout
        qkv_width = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = make_linear(config, config.n_embd, qkv_width)  # one matmul for q, k and v
        self.sub_norm = make_sub_norm(config, config.n_head * config.head_size)
        self.proj = make_linear(config, config.n_head * config.head_size, config.n_embd)
        self.proj.is_residual_projection = True
        self.resid_dropout = make_dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache=None,
        cache_position: Optional[torch.Tensor] = None,
        output_qkv: bool = False,
    ):
        """The output, and the keys and values attended over (the cache's, when there is one).

        output_qkv: also return this call's queries, keys and values, (B, heads, T, head_size) each,
        queries and keys rotated (what the attention scores use), for attention-relation distillation.
        """
        B, T, _ = x.shape
        H, G = self.n_head, self.n_query_groups
        # the fused projection's rows are [H query heads | G key heads | G value heads]
        heads = self.qkv(x).view(B, T, H + 2 * G, self.head_size).transpose(1, 2)
        rotated = apply_rotary(heads[:, : H + G], cos, sin)  # queries and keys in one pass
        q, k, v = rotated[:, :H], rotated[:, H:], heads[:, H + G :]
        new_qkv = (q, k, v)
        if cache is not None:
            k, v = cache.update(k, v, cache_position)

        # no mask means plain causal attention over keys that end with these queries (masks.py
        # leaves it out only then); one query may see all of them, which SDPA's flag would not allow
        # enable_gqa: each key/value head serves n_head / n_query_groups consecutive query heads
        # (transformers' repeat_kv layout) without copying keys and values per query head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None and T > 1,
            enable_gqa=self.n_query_groups != self.n_head,
        )
        y = y.transpose(1, 2).reshape(B, T, H * self.head_size)
        if self.sub_norm is not None:
            y = self.sub_norm(y)
        out = self.resid_dropout(self.proj(y))
        return (out, (k, v), new_qkv) if output_qkv else (out, (k, v))
