"""Preference pairs mined from the corpus, so the SFT and DPO recipes run offline with no data of their own.

A speech's opening is the prompt, its true continuation the chosen side, and the same stretch of
another speech alike in length the rejected side: plausible Shakespeare that does not follow.
"""

from __future__ import annotations

import random

from picogpt_lightning.data.splits import speech_spans, split_point
from picogpt_lightning.errors import UserError


def shakespeare_pairs(
    text: str, split: str, val_fraction: float = 0.1, prompt_chars: int = 32, completion_chars: int = 32, seed: int = 0,
    rejected_per_prompt: int = 1, prompts_per_speech: int = 1,
) -> list[dict]:
    """Preference pairs from the speeches of one split of the corpus, deterministic given `seed`.

    prompt = a speech's opening `prompt_chars` characters (speaker name included), chosen = its
    next `completion_chars` characters, rejected = the same stretch of another speech of similar
    length: plausible Shakespeare that does not continue this prompt. A speech belongs to the
    split its first character is in, as in TinyShakespeareDataModule's speeches mode, and a
    rejected continuation comes from the same split, so validation pairs never see training text.
    `rejected_per_prompt` > 1 pairs each prompt with that many rejected continuations, from the
    speeches nearest to it in length (one pair each): more, more varied pairs from the same speeches.
    `prompts_per_speech` > 1 also cuts each speech's opening shorter, `completion_chars` at a time
    (its first prompt_chars, prompt_chars - completion_chars, ... characters), each a prompt with
    the next `completion_chars` as chosen and the same stretch of the rejected speeches.
    """
    shortest = prompt_chars - (prompts_per_speech - 1) * completion_chars
    if shortest < 1:
        raise UserError(
            f"prompts_per_speech {prompts_per_speech} would cut prompts to {shortest} characters; each prompt is "
            f"completion_chars ({completion_chars}) shorter than the last: need prompts_per_speech <= "
            f"{(prompt_chars - 1) // completion_chars + 1}"
        )
    cut = split_point(text, val_fraction)
    need = prompt_chars + completion_chars
    spans = [(a, b) for a, b in speech_spans(text) if (a < cut) == (split == "train") and b - a >= need]
    if len(spans) < rejected_per_prompt + 1:
        raise UserError(
            f"the {split} split has {len(spans)} speech(es) of >= {need} characters, {rejected_per_prompt} rejected "
            f"per prompt need {rejected_per_prompt + 1}; lower prompt_chars/completion_chars/rejected_per_prompt "
            "or use a longer corpus"
        )
    by_length = sorted(spans, key=lambda span: (span[1] - span[0], span[0]))
    rng = random.Random(seed)
    pairs = []  # (start, pair), to return the pairs in corpus order
    for rank, (start, _) in enumerate(by_length):
        others = [by_length[other][0] for other in nearest_ranks(rank, len(by_length), rejected_per_prompt, rng)]
        for length in range(prompt_chars, shortest - 1, -completion_chars):
            end = length + completion_chars
            for other_start in others:
                pair = {
                    "prompt": text[start : start + length],
                    "chosen": text[start + length : start + end],
                    "rejected": text[other_start + length : other_start + end],
                }
                pairs.append((start, pair))
    return [pair for _, pair in sorted(pairs, key=lambda item: item[0])]


def nearest_ranks(rank: int, count: int, k: int, rng: random.Random) -> list[int]:
    """The k ranks nearest to `rank` in 0..count-1 (itself excluded), nearer first; of two at the
    same distance when only one is still needed, a random one. Neighbours in length order are
    speeches alike in length."""
    ranks, distance = [], 1
    while len(ranks) < k:
        sides = [other for other in (rank - distance, rank + distance) if 0 <= other < count]
        if len(sides) > k - len(ranks):
            sides = [rng.choice(sides)]
        ranks += sides
        distance += 1
    return ranks
