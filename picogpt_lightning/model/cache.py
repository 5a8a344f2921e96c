"""KV caches behind one interface: attention calls `layer.update(k, v, cache_position)`.

Two kinds, as transformers has them:

- `DynamicCache` grows: each update concatenates the new keys and values, so attention
  sees exactly the tokens written so far. Simple, but every step has new shapes.
- `StaticCache` (also importable as `StaticKVCache`) is preallocated: every layer owns
  (batch, n_query_groups, max_length, head_size) buffers from the start, written in place
  at `cache_position` (a tensor, so the position is data, not part of a compiled program);
  attention reads the whole buffer and the mask hides the positions not written yet. Every
  decode step has the same shapes, so it compiles once and may replay as a CUDA graph
  (litgpt, gpt-fast and transformers' StaticCache work so).

Both answer the model's one question, `prepare(batch, new_tokens, attention_mask,
cache_position)`: where the new tokens go and how many keys attention will see; the mask
and positions are then built from that in `masks.py`, whatever the cache.
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from picogpt_lightning.model.config import PicoGPTConfig

KeysValues = Tuple[torch.Tensor, torch.Tensor]  # each (B, n_query_groups, T_keys, head_size)


class KVCache:
    """Keys and values of every layer. `layers[i].update(k, v, cache_position)` -> (keys, values) to attend over.

    Indexing and iterating give (keys, values) pairs per layer, the layout of transformers'
    legacy tuple caches.
    """

    layers: list
    # True where update returns exactly the tokens written so far, the new ones last: the
    # attention mask may then be left out when there is no padding
    contiguous = True

    def prepare(
        self, batch: int, new_tokens: int, attention_mask: Optional[torch.Tensor], cache_position, device
    ) -> Tuple[torch.Tensor, int]:
        """Checks the inputs against the cache; returns the new tokens' cache_position (T,) and the key count."""
        raise NotImplementedError

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps row rows[i] as row i (beam search following its surviving beams)."""
        raise NotImplementedError

    def mask_width(self, length: int) -> int:
        """The attention_mask width forward expects once the cache holds `length` tokens."""
        return length

    def __getitem__(self, layer: int) -> KeysValues:
        return self.layers[layer].keys, self.layers[layer].values

    def __iter__(self) -> Iterator[KeysValues]:
        return (self[layer] for layer in range(len(self.layers)))

    def __len__(self) -> int:
        return len(self.layers)


def check_mask_shape(attention_mask: Optional[torch.Tensor], expected: Tuple[int, int], what: str) -> None:
    if attention_mask is not None and attention_mask.shape != expected:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} ({what})")


def appended_positions(
    past_length: int, batch: int, new_tokens: int, attention_mask: Optional[torch.Tensor], device
) -> Tuple[torch.Tensor, int]:
    """Positions of tokens appended after `past_length` cached ones (none: no cache), and the key count after them."""
    key_length = past_length + new_tokens
    check_mask_shape(attention_mask, (batch, key_length), "batch, cached + new tokens")
    return torch.arange(past_length, key_length, device=device), key_length


# ---- the growing cache ------------------------------------------------------------------------


class DynamicLayer:
    """One layer's keys and values so far; each update appends along the sequence."""

    def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None):
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: Optional[torch.Tensor] = None) -> KeysValues:
        # cache_position is implied: new tokens always follow the ones cached
        if self.keys is not None:
            k = torch.cat((self.keys, k), dim=2)
            v = torch.cat((self.values, v), dim=2)
        self.keys, self.values = k, v
        return k, v


class DynamicCache(KVCache):
    """The growing cache: `PicoGPT(..., use_cache=True)` makes one and returns it, extended in place."""

    def __init__(self, n_layer: int):
        self.layers: List[DynamicLayer] = [DynamicLayer() for _ in range(n_layer)]

    @classmethod
    def from_legacy_cache(cls, past_key_values: Sequence[KeysValues]) -> "DynamicCache":
        """A cache holding a tuple of (keys, values) per layer; the tuples themselves stay untouched."""
        cache = cls(0)
        cache.layers = [DynamicLayer(keys, values) for keys, values in past_key_values]
        return cache

    def to_legacy_cache(self) -> Tuple[KeysValues, ...]:
        return tuple(self)

    def get_seq_length(self) -> int:
        keys = self.layers[0].keys if self.layers else None
        return 0 if keys is None else keys.shape[2]

    def prepare(self, batch, new_tokens, attention_mask, cache_position, device):
        return appended_positions(self.get_seq_length(), batch, new_tokens, attention_mask, device)

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


# ---- the preallocated cache -------------------------------------------------------------------


class StaticLayer:
    """One layer's key and value buffers, each (batch, n_query_groups, max_length, head_size)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.set_buffers(keys, values)

    def set_buffers(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # the compiled step writes into these: a CUDA graph may then keep reading them in
        # place instead of skipping capture for a mutated input (no effect elsewhere)
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> KeysValues:
        """Writes k, v (batch, groups, T, head_size) at positions cache_position (T,); returns the whole buffers."""
        self.keys.index_copy_(2, cache_position, k.to(self.keys.dtype))
        self.values.index_copy_(2, cache_position, v.to(self.values.dtype))
        return self.keys, self.values


class StaticCache(KVCache):
    """Keys and values of every layer for up to `max_length` positions of `batch` sequences.

    Pass it as `PicoGPT.forward(..., past_key_values=cache, cache_position=positions)` with an
    attention_mask of (batch, max_length) whose unwritten positions are 0 (or no mask: no padding).
    """

    contiguous = False  # attention reads the whole buffer, written or not

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
        self.layers: List[StaticLayer] = [
            StaticLayer(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.n_layer)
        ]

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    def mask_width(self, length: int) -> int:
        return self.max_length

    def prepare(self, batch, new_tokens, attention_mask, cache_position, device):
        # shapes only, no tensor values read on the host: a decode step compiles to one graph
        if cache_position is None or cache_position.shape != (new_tokens,):
            raise ValueError(
                f"a StaticKVCache needs cache_position, a tensor of the {new_tokens} positions the new tokens take"
            )
        if self.batch_size != batch:
            raise ValueError(f"the StaticKVCache holds {self.batch_size} rows but input_ids has {batch}")
        check_mask_shape(attention_mask, (batch, self.max_length), "batch, the static cache's max_length")
        return cache_position, self.max_length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps row rows[i] as row i.

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


StaticKVCache = StaticCache  # the name benchmarks and existing callers use


def as_cache(past_key_values, use_cache: bool, n_layer: int) -> Optional[KVCache]:
    """The cache a forward pass writes to: the one given, one wrapping legacy (keys, values) tuples,
    a new growing one when use_cache asks for it, or None."""
    if isinstance(past_key_values, KVCache):
        return past_key_values
    if past_key_values:
        return DynamicCache.from_legacy_cache(past_key_values)
    return DynamicCache(n_layer) if use_cache else None
