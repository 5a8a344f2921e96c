"""Decoding: greedy, sampling and beam search over PicoGPT's KV cache.

Arguments, defaults and results follow transformers' `generate`, so the two can be
compared token for token (the tests do, against LlamaForCausalLM on exported weights):

- the result is (batch * num_return_sequences, prompt + generated) and holds the prompt;
- a sequence that has produced an eos token continues with pad tokens, and decoding
  stops early once every sequence has finished;
- left-padded prompts carry an attention_mask (1 = real token); without one, a given
  pad_token_id found in the prompt marks padding (unless it is also an eos token);
- logits are processed in transformers' order: repetition penalty, then (sampling only)
  temperature, top-k, top-p. `top_k=None` here means no top-k (transformers' own default is 50).

One deliberate difference: transformers' beam search fills the tail of a hypothesis that
ended early with eos instead of pad when pad_token_id is 0 (it tests the id for truth);
here the filler is always pad_token_id, as in its greedy and sampling modes.

The settings are one `transformers.GenerationConfig` (settings.py); keyword arguments
update a copy of it, and fields it leaves unset take this project's `DEFAULTS`. The cache
is the growing one by default; with `cache_implementation="static"` it is preallocated and
the decode step, with the same shapes every token, is compiled once per (batch, max length)
with `torch.compile(fullgraph=True)` (compiled.py; `disable_compile=True` runs it eagerly).
Nothing here imports Lightning.
"""

from typing import Optional

import torch
from transformers import GenerationConfig

from picogpt_lightning.generation.beam import beam_search
from picogpt_lightning.generation.compiled import decode_step_for
from picogpt_lightning.generation.decode import CachedScorer, RecomputingScorer, decode_n_tokens, next_token_logits
from picogpt_lightning.generation.processors import PaddingAwareRepetitionPenalty, logits_processors
from picogpt_lightning.generation.settings import DEFAULTS, prepare_inputs, resolve_generation_config, validate_inputs
from picogpt_lightning.generation.text import TextStream, decode_outputs, encode_prompts, generate_texts

__all__ = [
    "DEFAULTS", "PaddingAwareRepetitionPenalty", "TextStream", "decode_outputs", "decode_step_for", "encode_prompts", "generate",
    "generate_texts", "logits_processors", "next_token_logits", "resolve_generation_config",
]


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    generation_config: Optional[GenerationConfig] = None,
    streamer=None,
    **kwargs,
) -> torch.LongTensor:
    """Continues each prompt by up to max_new_tokens tokens; see the module docstring for the rules.

    `streamer` (greedy and sampling only) is anything with transformers' streamer interface:
    `put(token_ids)` is called with the prompt, then with each step's new tokens, and `end()` last.
    """
    config = resolve_generation_config(generation_config, **kwargs)
    validate_inputs(model.config, config, input_ids, attention_mask, streamer)
    input_ids, attention_mask, eos, pad_token_id = prepare_inputs(config, input_ids, attention_mask)
    num_beams, num_return_sequences = config.num_beams, config.num_return_sequences
    # beam sampling keeps room for a non-eos continuation, as transformers does
    processors = logits_processors(config, min_tokens_to_keep=1 + max(1, len(eos)) if num_beams > 1 else 1)
    if config.use_cache:
        max_length = input_ids.shape[1] + config.max_new_tokens
        step = decode_step_for(config, input_ids.device)
        scorer = CachedScorer(model, config.cache_implementation, max_length, step)
    else:
        scorer = RecomputingScorer(model)
    common = dict(
        scorer=scorer, processors=processors, max_new_tokens=config.max_new_tokens, eos=eos,
        pad_token_id=pad_token_id, do_sample=config.do_sample,
    )
    if num_beams == 1:
        if num_return_sequences > 1:  # independent samples of each prompt
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        return decode_n_tokens(input_ids, attention_mask, streamer=streamer, **common)
    return beam_search(
        input_ids, attention_mask, num_beams=num_beams, num_return_sequences=num_return_sequences,
        length_penalty=config.length_penalty, early_stopping=config.early_stopping, **common,
    )
