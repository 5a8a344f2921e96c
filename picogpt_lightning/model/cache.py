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
cache_position)`: where the new tokens go and the absolute position of every key attention
will see; the mask and rotary positions are then built from that in `masks.py`, whatever the cache.

Past `block_size` both slide, as transformers' Mistral does with `sliding_window=block_size`:
each query sees itself and the `block_size - 1` tokens before it. Positions keep counting
(rotary attention depends only on distances, which stay below block_size). The growing
cache keeps only the last `block_size - 1` tokens; the static one is a ring buffer of
`min(max_length, block_size)` slots, slot = position % slots, so a compiled decode step
stays one graph across the wrap.
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
    # True where update returns the tokens in the window, in order, the new ones last: the
    # attention mask may then be left out when there is no padding
    contiguous = True
    window: Optional[int] = None  # a query sees at most this many keys, itself included (None: all)

    def prepare(
        self, batch: int, new_tokens: int, attention_mask: Optional[torch.Tensor], cache_position, device
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Checks the inputs against the cache; returns the new tokens' cache_position (T,) and
        the absolute position of each key attention will see (key_count,), -1 for an empty slot."""
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
    seen: int, kept: int, batch: int, new_tokens: int, attention_mask: Optional[torch.Tensor], device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of tokens appended after `seen` earlier ones of which the last `kept` are cached
    (0, 0: no cache), and the positions of the keys: the kept ones, then the new ones."""
    total = seen + new_tokens
    check_mask_shape(attention_mask, (batch, total), "batch, earlier + new tokens")
    return torch.arange(seen, total, device=device), torch.arange(seen - kept, total, device=device)


# ---- the growing cache ------------------------------------------------------------------------


class DynamicLayer:
    """One layer's keys and values so far; each update appends along the sequence and, with a
    window, keeps only the `window - 1` tokens the next query can still see."""

    def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None, window=None):
        self.keys, self.values, self.window = keys, values, window

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: Optional[torch.Tensor] = None) -> KeysValues:
        # cache_position is implied: new tokens always follow the ones cached
        if self.keys is not None:
            k = torch.cat((self.keys, k), dim=2)
            v = torch.cat((self.values, v), dim=2)
        if self.window is not None and k.shape[2] >= self.window:
            start = k.shape[2] - (self.window - 1)
            self.keys, self.values = k[:, :, start:], v[:, :, start:]
        else:
            self.keys, self.values = k, v
        return k, v  # this step's queries may see any of them; the mask draws each one's window

    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class DynamicCache(KVCache):
    """The growing cache: `PicoGPT(..., use_cache=True)` makes one and returns it, extended in place.

    With `window` (the model gives its block_size) it holds the last window - 1 tokens at most."""

    def __init__(self, n_layer: int, window: Optional[int] = None):
        self.window = window
        self.layers: List[DynamicLayer] = [DynamicLayer(window=window) for _ in range(n_layer)]
        self.seen = 0  # tokens written so far, the ones that slid out of the window included

    @classmethod
    def from_legacy_cache(cls, past_key_values: Sequence[KeysValues], window: Optional[int] = None) -> "DynamicCache":
        """A cache holding a tuple of (keys, values) per layer; the tuples themselves stay untouched."""
        cache = cls(0, window)
        cache.layers = [DynamicLayer(keys, values, window) for keys, values in past_key_values]
        cache.seen = cache.layers[0].kept() if cache.layers else 0
        return cache

    def to_legacy_cache(self) -> Tuple[KeysValues, ...]:
        return tuple(self)

    def get_seq_length(self) -> int:
        """Tokens seen so far (as transformers counts for a sliding cache), not only those still held."""
        return self.seen

    def prepare(self, batch, new_tokens, attention_mask, cache_position, device):
        kept = self.layers[0].kept() if self.layers else 0
        positions = appended_positions(self.seen, kept, batch, new_tokens, attention_mask, device)
        self.seen += new_tokens
        return positions

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


# ---- the preallocated cache -------------------------------------------------------------------


class StaticLayer:
    """One layer's key and value buffers, each (batch, n_query_groups, slots, head_size), slot = position % slots."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.set_buffers(keys, values)

    def set_buffers(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # the compiled step writes into these: a CUDA graph may then keep reading them in
        # place instead of skipping capture for a mutated input (no effect elsewhere)
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> KeysValues:
        """Writes k, v (batch, groups, T, head_size) for positions cache_position (T,) into their slots.

        One token (a decode step) is written first and the whole ring returned: the slot it
        takes held a position a full window back, out of sight. Several tokens (a prompt) may
        need keys their own writing would overwrite, so the ring as it was is returned with the
        new keys after it, and only the last `slots` of them are kept.
        """
        slots = self.keys.shape[2]
        k, v = k.to(self.keys.dtype), v.to(self.values.dtype)
        if k.shape[2] == 1:
            self.write(k, v, cache_position % slots)
            return self.keys, self.values
        keys, values = torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)
        self.write(k[:, :, -slots:], v[:, :, -slots:], cache_position[-slots:] % slots)
        return keys, values

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self.keys.index_copy_(2, slots, k)
        self.values.index_copy_(2, slots, v)


class StaticCache(KVCache):
    """Keys and values of every layer for `batch` sequences of up to `max_length` positions.

    It holds min(max_length, block_size) slots: past block_size a slot is reused once its
    token has slid out of every later query's window. Pass it as `PicoGPT.forward(...,
    past_key_values=cache, cache_position=positions)` with an attention_mask of
    (batch, max_length) whose unwritten positions are 0 (or no mask: no padding).
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
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"StaticKVCache max_length must be a positive integer, got {max_length!r}")
        slots = min(max_length, config.block_size)
        shape = (batch, config.n_query_groups, slots, config.head_size)
        self.max_length, self.window = max_length, config.block_size
        self.layers: List[StaticLayer] = [
            StaticLayer(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.n_layer)
        ]
        # the absolute position each slot holds (-1: none yet); data, so the wrap changes no graph
        self.slot_positions = torch.full((slots,), -1, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.slot_positions)

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
        slots = self.slot_positions.shape[0]
        if new_tokens == 1:  # as StaticLayer.update: written first, then the ring is read
            self.slot_positions.index_copy_(0, cache_position % slots, cache_position)
            return cache_position, self.slot_positions.clone()
        key_positions = torch.cat((self.slot_positions, cache_position))
        self.slot_positions.index_copy_(0, cache_position[-slots:] % slots, cache_position[-slots:])
        return cache_position, key_positions

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


def as_cache(past_key_values, use_cache: bool, config: PicoGPTConfig) -> Optional[KVCache]:
    """The cache a forward pass writes to: the one given, one wrapping legacy (keys, values) tuples,
    a new growing one when use_cache asks for it, or None; made ones slide past block_size."""
    if isinstance(past_key_values, KVCache):
        return past_key_values
    if past_key_values:
        return DynamicCache.from_legacy_cache(past_key_values, window=config.block_size)
    return DynamicCache(config.n_layer, window=config.block_size) if use_cache else None
