"""A preallocated (static) KV cache: fixed-shape buffers written in place at given positions.

The growing cache (`past_key_values` tuples) concatenates each step's keys and values, so
every step has new shapes and nothing can be compiled or captured as a CUDA graph. Here
every layer owns buffers of (batch, n_query_groups, max_length, head_size) from the start;
a forward pass writes its keys and values at `cache_position` (a tensor, so the position is
data, not part of the compiled program) and attends over the whole buffer through a mask
that hides the positions not written yet. litgpt and transformers' StaticCache work so.
"""

from typing import List, Optional, Tuple

import torch

from picogpt_lightning.model.config import PicoGPTConfig


class StaticLayerCache:
    """One layer's key and value buffers, each (batch, n_query_groups, max_length, head_size)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.set_buffers(keys, values)

    def set_buffers(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # the compiled step writes into these: a CUDA graph may then keep reading them in
        # place instead of skipping capture for a mutated input (no effect elsewhere)
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (batch, groups, T, head_size) at positions cache_position (T,); returns the whole buffers."""
        self.keys.index_copy_(2, cache_position, k.to(self.keys.dtype))
        self.values.index_copy_(2, cache_position, v.to(self.values.dtype))
        return self.keys, self.values


class StaticKVCache:
    """Keys and values of every layer for up to `max_length` positions of `batch` sequences.

    Pass it as `PicoGPT.forward(..., past_key_values=cache, cache_position=positions)` with an
    attention_mask of (batch, max_length) whose unwritten positions are 0 (or no mask: no padding).
    """

    def __init__(
        self,
        config: PicoGPTConfig,
        batch: int,
        max_length: int,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ):
        if not 0 < max_length <= config.block_size:
            raise ValueError(
                f"StaticKVCache max_length {max_length} must be in [1, block_size {config.block_size}]; "
                "shorten the prompt or lower max_new_tokens"
            )
        shape = (batch, config.n_query_groups, max_length, config.head_size)
        self.max_length = max_length
        self.layers: List[StaticLayerCache] = [
            StaticLayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.n_layer)
        ]

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    def __getitem__(self, layer: int) -> StaticLayerCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def buffers(self) -> List[torch.Tensor]:
        return [buffer for layer in self.layers for buffer in (layer.keys, layer.values)]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps row rows[i] as row i (beam search following its surviving beams).

        With as many rows as before the buffers are overwritten in place, so their
        addresses (which a captured CUDA graph reads) stay the same; a different
        count (one prompt fanned out to its beams) makes new buffers.
        """
        for layer in self.layers:
            keys, values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            if keys.shape == layer.keys.shape:
                layer.keys.copy_(keys)
                layer.values.copy_(values)
            else:
                layer.set_buffers(keys, values)


def static_attention_mask(
    attention_mask: Optional[torch.Tensor], cache_position: torch.Tensor, max_length: int
) -> torch.Tensor:
    """A boolean (B or 1, 1, T_q, max_length) mask over the whole buffer: causal, written, not a pad.

    Built from tensors only (no host sync, same shapes every step). Positions after a
    query are causally hidden, which also hides every position not written yet. As in
    `layers.build_attention_mask`, a query may always see itself, so a pad query of a
    left-padded row gets a finite output.
    """
    key_pos = torch.arange(max_length, device=cache_position.device)[None, :]
    query_pos = cache_position[:, None]
    causal = key_pos <= query_pos  # (T_q, max_length)
    if attention_mask is None:
        return causal[None, None]
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, max_length)
    return (causal & keep) | (key_pos == query_pos)


def static_position_ids(
    attention_mask: Optional[torch.Tensor], cache_position: torch.Tensor, batch: int
) -> torch.Tensor:
    """Rotary position of each new token: its count of real tokens before it, so padding shifts nothing."""
    if attention_mask is None:
        return cache_position[None, :].expand(batch, -1)
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return positions.index_select(1, cache_position)
