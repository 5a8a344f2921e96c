"""Decoding in gpt-fast's shape: `prefill` the prompt, then `decode_one_token` per step.

A scorer holds the model and its KV cache and gives each row's next-token logits; the
greedy/sampling loop (`decode_n_tokens`) and beam search (`beam.py`) drive it the same way
whatever the cache. The cache is one of `picogpt_lightning.model.cache`: its kind only
decides how it is made and how wide the attention mask it reads is.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from picogpt_lightning.model.cache import DynamicCache, KVCache, StaticKVCache


def next_token_logits(model, input_ids, cache_position, attention_mask, cache: KVCache) -> torch.Tensor:
    """One forward pass over the cache: the float logits of each row's last token (the only
    position projected to the vocabulary)."""
    output = model(
        input_ids, attention_mask=attention_mask, past_key_values=cache, cache_position=cache_position,
        logits_to_keep=1,
    )
    return output.logits[:, -1].float()


def make_cache(model, cache_implementation: Optional[str], batch: int, max_length: int, device) -> KVCache:
    if cache_implementation == "static":
        return StaticKVCache(model.config, batch, max_length, device, model.lm_head.weight.dtype)
    return DynamicCache(model.config.n_layer, window=model.config.block_size)


class CachedScorer:
    """Next-token logits over a KV cache: the prompt in eager passes of at most block_size tokens
    (its length varies from call to call), then one `decode_step` per token.

    A prompt past block_size goes through the cache a window at a time: each pass attends over
    at most 2 x block_size keys, so prefill's memory and work per token are bounded by the window,
    never by the prompt (one pass over a 1 MB prompt would build a (T, T) mask). Every query sees
    the same keys as in one pass, as the window slides; a prompt within block_size is one pass.

    `decode_step` is `next_token_logits` or a compiled copy of it (`compiled.py`): over a
    static cache it has the same shapes every step, so it compiles once.
    """

    def __init__(self, model, cache_implementation: Optional[str], max_length: int, decode_step=next_token_logits):
        self.model, self.max_length, self.decode_step = model, max_length, decode_step
        self.cache_implementation = cache_implementation
        self.cache: Optional[KVCache] = None
        self.mask: Optional[torch.Tensor] = None
        self.length = 0

    def prefill(self, sequences: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, length = sequences.shape
        device = sequences.device
        self.cache = make_cache(self.model, self.cache_implementation, batch, self.max_length, device)
        chunk = self.model.config.block_size
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            self.length = end
            mask = None if attention_mask is None else attention_mask[:, :end]
            positions = torch.arange(start, end, device=device)
            logits = next_token_logits(self.model, sequences[:, start:end], positions, self.mask_for(mask), self.cache)
        return logits

    def decode_one_token(self, sequences: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits after the sequences' one token the cache has not seen yet."""
        length = sequences.shape[1]
        assert length == self.length + 1, "after the prompt, the cache takes one token per call"
        self.length = length
        position = torch.tensor([length - 1], device=sequences.device)
        return self.decode_step(self.model, last_tokens(sequences), position, self.mask_for(attention_mask), self.cache)

    def mask_for(self, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The mask as wide as the cache reads it: a preallocated cache's buffer, unwritten positions 0."""
        width = self.cache.mask_width(self.length)
        if attention_mask is None or width == attention_mask.shape[1]:
            return attention_mask
        if self.mask is None or self.mask.shape[0] != attention_mask.shape[0]:
            self.mask = attention_mask.new_zeros(attention_mask.shape[0], width)
        self.mask[:, : self.length] = attention_mask
        return self.mask

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps cache row rows[i] as row i (beam search following its surviving beams)."""
        self.cache.select_rows(rows)


class RecomputingScorer:
    """No cache (use_cache=False): every step runs the whole sequences again, the reference path."""

    def __init__(self, model):
        self.model = model

    def prefill(self, sequences: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.model(sequences, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1].float()

    decode_one_token = prefill

    def select_rows(self, rows: torch.Tensor) -> None:
        pass  # nothing is kept between steps


def last_tokens(sequences: torch.Tensor) -> torch.Tensor:
    # a fresh (batch, 1) tensor: a slice would carry the sequences' row stride, which
    # grows every step and which dynamo guards on (a recompilation per token)
    return sequences[:, -1:].clone(memory_format=torch.contiguous_format)


def extend_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask after one more (real) token."""
    if attention_mask is None:
        return None
    return torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), dim=1)


def pick_tokens(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """The most likely token of each row, or a draw from its processed distribution."""
    if do_sample:
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def decode_n_tokens(
    input_ids, attention_mask, scorer, processors, max_new_tokens: int, eos: List[int], pad_token_id, do_sample,
    streamer,
) -> torch.Tensor:
    """Greedy or sampled decoding, one token per step; finished rows continue with pad_token_id."""
    sequences = input_ids
    eos_tokens = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = scorer.prefill(sequences, attention_mask)
    for step in range(max_new_tokens):
        if step > 0:
            logits = scorer.decode_one_token(sequences, attention_mask)
        next_tokens = pick_tokens(processors(sequences, logits, counted_positions=attention_mask), do_sample)
        if eos:
            next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
        sequences = torch.cat((sequences, next_tokens[:, None]), dim=1)
        attention_mask = extend_mask(attention_mask)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos:
            unfinished &= ~torch.isin(next_tokens, eos_tokens)
            if not bool(unfinished.any()):
                break
    if streamer is not None:
        streamer.end()
    return sequences
