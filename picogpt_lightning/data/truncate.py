"""Prompt/completion examples to token ids, cut to a length budget by trl's rule."""

from __future__ import annotations

from collections.abc import Sequence

from picogpt_lightning.data.conversations import as_text
from picogpt_lightning.tokenizer import Tokenizer


def truncate(prompt: list[int], completions: Sequence[list[int]], max_length: int, max_prompt_length: int):
    """trl's rule: if prompt + longest completion exceeds max_length, keep the prompt's last
    max_prompt_length tokens (the ones next to the completion); then cut completions to fit."""
    longest = max(len(completion) for completion in completions)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, [completion[:room] for completion in completions]


def tokenize(batch: dict, tokenizer: Tokenizer, completion_columns: Sequence[str], max_length: int,
             max_prompt_length: int) -> dict:
    """`Dataset.map` function: token ids of the prompt and of each completion, truncated to max_length.
    A plain function of its arguments, so `datasets` can fingerprint it and reuse its cache.

    Every completion ends with EOS, as trl appends it, so a fine-tuned model learns where to stop
    (a character vocabulary has no EOS, and its completions stay as they are)."""
    texts, templated = as_text(batch, tokenizer, completion_columns)
    prompts = [tokenizer.encode(text, add_special_tokens=not rendered) for text, rendered in zip(texts["prompt"], templated)]
    encoded = {column: with_eos(tokenizer.encode_batch(texts[column]), tokenizer.eos_token_id)
               for column in completion_columns}
    out = {f"{column}_ids": [] for column in ("prompt", *completion_columns)}
    for i, prompt in enumerate(prompts):
        prompt, completions = truncate(prompt, [encoded[column][i] for column in completion_columns],
                                       max_length, max_prompt_length)
        out["prompt_ids"].append(prompt)
        for column, completion in zip(completion_columns, completions):
            out[f"{column}_ids"].append(completion)
    return out


def with_eos(completions: list[list[int]], eos_token_id: int | None) -> list[list[int]]:
    if eos_token_id is None:
        return completions
    return [ids if ids[-1:] == [eos_token_id] else ids + [eos_token_id] for ids in completions]
