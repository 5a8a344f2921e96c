"""Prompt/completion examples to token ids, cut to a length budget by trl's rule."""

from __future__ import annotations

from collections.abc import Sequence

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
    A plain function of its arguments, so `datasets` can fingerprint it and reuse its cache."""
    prompts = tokenizer.encode_batch(batch["prompt"])
    encoded = {column: tokenizer.encode_batch(batch[column]) for column in completion_columns}
    out = {f"{column}_ids": [] for column in ("prompt", *completion_columns)}
    for i, prompt in enumerate(prompts):
        prompt, completions = truncate(prompt, [encoded[column][i] for column in completion_columns],
                                       max_length, max_prompt_length)
        out["prompt_ids"].append(prompt)
        for column, completion in zip(completion_columns, completions):
            out[f"{column}_ids"].append(completion)
    return out
