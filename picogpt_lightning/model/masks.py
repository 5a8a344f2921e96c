"""The attention mask and rotary positions of new tokens: the one place both are built.

Every cache (none, growing, preallocated) asks the same question: new tokens sit at
`cache_position` (T,), the keys attention reads sit at `key_positions`; which keys may each
see, and at which rotary position is each? Built from tensors only (no host sync), so a compiled decode
step has the same graph every token.
"""

from typing import Optional

import torch


def attention_mask_for(
    attention_mask: Optional[torch.Tensor],
    cache_position: torch.Tensor,
    key_positions: torch.Tensor,
    window: Optional[int],
    contiguous: bool,
) -> Optional[torch.Tensor]:
    """A boolean (B or 1, 1, T, key_count) mask, True = may attend: causal, in the window, not a pad key.

    `attention_mask` is (B, tokens so far), 1 = real token, or None (no padding);
    `cache_position` (T,) and `key_positions` (key_count,) are the absolute positions of the new
    tokens and of each key, -1 for an empty slot; or (B, T) and (B, key_count) when each row keeps
    its own positions (a `RowCache`: rows of a continuous batch, never padded);
    `window`: a query sees the keys less than `window` positions back, itself included, as
    transformers' sliding_window does (None: every earlier key).
    `contiguous`: the keys are the tokens in the window, in order, the new ones last (no
    cache, or a growing one). Without padding the mask is then None whenever SDPA's own
    causal flag (no past, within the window) or no mask at all (one new token) is exact, its
    fastest path; a preallocated buffer always needs one, to hide the slots not written yet.

    A given mask is always applied: asking whether it is all ones would stall the GPU and
    break a compiled graph, so callers that know there is no padding pass None. Every query
    may always see itself, so a pad query whose keys are all pads (left padding) gets a
    finite output instead of NaN; real tokens never read pad positions, so that choice
    reaches no real output.
    """
    new_tokens, key_count = cache_position.shape[-1], key_positions.shape[-1]
    within_window = window is None or key_count <= window
    if attention_mask is None and contiguous and within_window and new_tokens in (1, key_count):
        return None
    key_pos = key_positions.unsqueeze(-2)  # (1, keys) or (B, 1, keys)
    query_pos = cache_position.unsqueeze(-1)  # (T, 1) or (B, T, 1)
    visible = (key_pos <= query_pos) & (key_pos >= 0)  # causal, and hides empty slots
    if window is not None:
        visible = visible & (key_pos > query_pos - window)
    if attention_mask is None:
        return visible.reshape(-1, 1, new_tokens, key_count)
    keep = attention_mask.index_select(1, key_positions.clamp(min=0))[:, None, None, :].bool()  # (B, 1, 1, keys)
    return (visible & keep) | (key_pos == query_pos)


def position_ids_for(attention_mask: Optional[torch.Tensor], cache_position: torch.Tensor, batch: int) -> torch.Tensor:
    """Rotary position of each new token, (batch, T): its count of real tokens before it, so padding shifts nothing."""
    if cache_position.dim() == 2:  # each row's own positions (a RowCache; no padding)
        return cache_position
    if attention_mask is None:
        return cache_position[None, :].expand(batch, -1)
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return positions.index_select(1, cache_position)
