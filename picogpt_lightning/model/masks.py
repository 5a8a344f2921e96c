"""The attention mask and rotary positions of new tokens: the one place both are built.

Every cache (none, growing, preallocated) asks the same question: new tokens sit at
`cache_position` (T,) among `key_length` keys; which keys may each see, and at which
rotary position is each? Built from tensors only (no host sync), so a compiled decode
step has the same graph every token.
"""

from typing import Optional

import torch


def attention_mask_for(
    attention_mask: Optional[torch.Tensor], cache_position: torch.Tensor, key_length: int, contiguous: bool
) -> Optional[torch.Tensor]:
    """A boolean (B or 1, 1, T, key_length) mask, True = may attend: causal and not a pad key.

    `attention_mask` is (B, key_length), 1 = real token, or None (no padding).
    `contiguous`: the keys are exactly the tokens written so far, the new ones last (no
    cache, or a growing one). Without padding the mask is then None whenever SDPA's own
    causal flag (no past) or no mask at all (one new token) is exact, its fastest path;
    a preallocated buffer always needs one, to hide the positions not written yet.

    A given mask is always applied: asking whether it is all ones would stall the GPU and
    break a compiled graph, so callers that know there is no padding pass None. Every query
    may always see itself, so a pad query whose keys are all pads (left padding) gets a
    finite output instead of NaN; real tokens never read pad positions, so that choice
    reaches no real output.
    """
    new_tokens = cache_position.shape[0]
    if attention_mask is None and contiguous and new_tokens in (1, key_length):
        return None
    key_pos = torch.arange(key_length, device=cache_position.device)[None, :]
    query_pos = cache_position[:, None]
    causal = key_pos <= query_pos  # (T, key_length); also hides every position not written yet
    if attention_mask is None:
        return causal[None, None]
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, key_length)
    return (causal & keep) | (key_pos == query_pos)


def position_ids_for(attention_mask: Optional[torch.Tensor], cache_position: torch.Tensor, batch: int) -> torch.Tensor:
    """Rotary position of each new token, (batch, T): its count of real tokens before it, so padding shifts nothing."""
    if attention_mask is None:
        return cache_position[None, :].expand(batch, -1)
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return positions.index_select(1, cache_position)
