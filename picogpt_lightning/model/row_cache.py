"""A preallocated KV cache whose rows each keep their own positions: the cache of continuous batching.

`StaticCache` gives every row the same positions, so its rows must start together (left
padding lines them up). Here each row is a sequence of its own: row r holds its token at
position p in slot p % slots, knows which position each of its slots holds, and one decode
step feeds every row its next token at its own position (`cache_position` (B, 1)). A row can
then be emptied and given a new sequence between two steps while the others go on.

Every row has min(max_length, block_size) slots, a ring as in `StaticCache`: a query sees itself
and the `block_size - 1` positions before it. With block_size slots any length decodes, in
memory bounded by the window; `max_length`, the longest sequence a row will then hold, keeps a
model with a long window (a Llama's 131,072) from reserving all of it for every row, and a row
of fewer slots than the window must never hold more than max_length positions.
`rows(n)` is a cache over the first n rows, made once per n and sharing the buffers: a step
over few busy rows costs a small batch, and each n keeps its shapes, so a compiled step is
one graph per n, whichever rows join or leave.
"""

from typing import Dict, List, Optional

import torch

from picogpt_lightning.model.cache import KeysValues, KVCache, StaticLayer
from picogpt_lightning.model.config import PicoGPTConfig


class RowLayer(StaticLayer):
    """One layer's keys and values, (rows, n_query_groups, slots, head_size) each, marked static as StaticLayer's."""

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> KeysValues:
        """Writes each row's one new key and value, (B, groups, 1, head_size), into the slot of its own position
        (cache_position (B, 1)) and returns the whole ring: the slot it takes held a position out of sight."""
        slots = (cache_position % self.keys.shape[2]).view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.keys.scatter_(2, slots, k.to(self.keys.dtype))
        self.values.scatter_(2, slots, v.to(self.values.dtype))
        return self.keys, self.values


class RowCache(KVCache):
    """Keys and values of `capacity` independent sequences; pass `rows(n)` to `PicoGPT.forward` with input_ids
    (n, 1), `cache_position` (n, 1) (each row's position) and no attention_mask."""

    contiguous = False  # attention reads the whole ring, written or not

    def __init__(self, config: PicoGPTConfig, capacity: int, device=None, dtype: torch.dtype = torch.float32,
                 max_length: Optional[int] = None, _base=None):
        if _base is not None:  # a view over the first `capacity` rows of `_base`
            self.layers = [RowLayer(layer.keys[:capacity], layer.values[:capacity]) for layer in _base.layers]
            self.slot_positions = _base.slot_positions[:capacity]
        else:
            slots = config.block_size if max_length is None else min(max_length, config.block_size)
            shape = (capacity, config.n_query_groups, slots, config.head_size)
            self.layers = [
                RowLayer(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(config.n_layer)
            ]
            # the absolute position each row's slot holds (-1: none)
            self.slot_positions = torch.full((capacity, slots), -1, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.slot_positions)
        self.config, self.window = config, config.block_size
        self.views: Dict[int, "RowCache"] = {}

    @property
    def batch_size(self) -> int:
        return self.slot_positions.shape[0]

    @property
    def max_length(self) -> int:  # the slots of a row (compiled steps are keyed by batch and this)
        return self.slot_positions.shape[1]

    def rows(self, count: int) -> "RowCache":
        """The cache over rows [0, count), the same object for the same count."""
        if count == self.batch_size:
            return self
        if count not in self.views:
            self.views[count] = RowCache(self.config, count, _base=self)
        return self.views[count]

    def prepare(self, batch, new_tokens, attention_mask, cache_position, device):
        if attention_mask is not None:
            raise ValueError("a RowCache's rows are never padded: pass no attention_mask")
        if new_tokens != 1 or cache_position is None or cache_position.shape != (batch, 1):
            raise ValueError("a RowCache takes one token per row, at cache_position (batch, 1): each row's position")
        if self.batch_size != batch:
            raise ValueError(f"this RowCache holds {self.batch_size} rows but input_ids has {batch}")
        self.slot_positions.scatter_(1, cache_position % self.max_length, cache_position)
        return cache_position, self.slot_positions.clone()

    def fill_row(self, row: int, layers: List[KeysValues], length: int) -> None:
        """Makes row `row` the sequence of `length` tokens whose last keys and values, per layer (groups, kept,
        head_size), are `layers`: all a next token may see, its last block_size - 1 at most."""
        kept = layers[0][0].shape[1]
        positions = torch.arange(length - kept, length, device=self.slot_positions.device)
        slots = positions % self.max_length
        self.slot_positions[row] = -1
        self.slot_positions[row].index_copy_(0, slots, positions)
        for layer, (keys, values) in zip(self.layers, layers):
            layer.keys[row].index_copy_(1, slots, keys.to(layer.keys.dtype))
            layer.values[row].index_copy_(1, slots, values.to(layer.values.dtype))

    def select_rows(self, rows: torch.Tensor) -> None:
        raise NotImplementedError("a RowCache's rows are independent sequences; beam search uses StaticCache")

