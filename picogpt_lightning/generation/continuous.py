"""Continuous batching: sequences join a running batch at the next decode step and leave it when done.

`ContinuousBatch` keeps a `RowCache` of `capacity` rows. `admit` gives a request its rows (and
`admit_many` several requests theirs): the prompts are prefilled eagerly, those within the window
in one left-padded forward, a longer one alone a window at a time as `generate` does; their keys
and values are copied into the rows they serve, and the first tokens are chosen. `step` then decodes one token
for every busy row in one call of the decode step, whatever each row's length; `release` frees a
request's rows for the next one. Busy rows are kept low, and a step takes the first n rows, n a
power of two: the compiled step is one graph per n (`compiled.py`), never one per arrival.

Each request keeps `generate`'s rules for its own tokens: repetition penalty, then (sampling)
temperature, top-k and top-p, in transformers' order; a seeded request draws from its own
generator, all its rows in one draw per step as `generate` draws them, so its tokens do not
depend on the requests decoded beside it. Nothing here knows about text or HTTP.
"""

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList

from picogpt_lightning.errors import UserError
from picogpt_lightning.generation.decode import CachedScorer, next_token_logits
from picogpt_lightning.generation.processors import logits_processors
from picogpt_lightning.generation.settings import validate_inputs
from picogpt_lightning.model.row_cache import RowCache


@dataclass(eq=False)
class Admitted:
    """One request's rows (its prompts, each n times, in order) and how they choose their tokens."""

    rows: List[int]
    config: GenerationConfig
    warpers: LogitsProcessorList  # temperature, top-k, top-p: what follows the repetition penalty
    generator: Optional[torch.Generator]  # a seeded request's own; None: torch's global one

    @property
    def sampling_key(self) -> tuple:
        """Rows with the same key are drawn in one call: a seeded request's alone, unseeded ones by settings."""
        if self.generator is not None:
            return ("seeded", id(self))
        return ("unseeded", self.config.temperature, self.config.top_k, self.config.top_p)


class ContinuousBatch:
    """Rows of independent sequences over one model, decoded together one token per `step`."""

    def __init__(self, model, capacity: int, decode_step: Callable = next_token_logits, max_length: Optional[int] = None):
        """`max_length`: the longest sequence (prompt + new tokens) a row will hold, which sizes the cache when it is
        shorter than the model's window; the caller keeps every request within it."""
        if capacity < 1:
            raise ValueError(f"a continuous batch needs at least one row, got capacity {capacity}")
        self.model, self.decode_step = model, decode_step
        weight = model.lm_head.weight
        self.device = weight.device
        self.cache = RowCache(model.config, capacity, self.device, weight.dtype, max_length)
        self.owners: List[Optional[Admitted]] = [None] * capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=self.device)  # each row's next input
        self.positions = torch.zeros(capacity, dtype=torch.long, device=self.device)  # and its position
        # the tokens each row's sequence holds so far, for the repetition penalty
        self.seen = torch.zeros(capacity, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.penalty = torch.ones(capacity, device=self.device)

    @property
    def capacity(self) -> int:
        return len(self.owners)

    def free_rows(self) -> int:
        return self.owners.count(None)

    def busy(self) -> bool:
        return self.free_rows() < self.capacity

    def admit(self, prompts: List[List[int]], n: int, config: GenerationConfig,
              seed: Optional[int] = None) -> Tuple[Admitted, List[int]]:
        """Takes rows for each prompt's n sequences (prompt by prompt), prefills them and chooses their first
        tokens: (the request's handle, those tokens). Raises ValueError if too few rows are free."""
        return self.admit_many([(prompts, n, config, seed)])[0]

    def check(self, prompts: List[List[int]], config: GenerationConfig) -> None:
        """generate's own checks of a request, and that it fits a row: a UserError whose one line names what is wrong."""
        rows_hold = self.cache.max_length  # positions a row holds; past them it slides only if that is the window
        for prompt in prompts:
            validate_inputs(self.model.config, config, torch.tensor([prompt], dtype=torch.long), None, None)
            if rows_hold < self.model.config.block_size and len(prompt) + config.max_new_tokens > rows_hold:
                raise UserError(f"a prompt of {len(prompt)} tokens and max_new_tokens {config.max_new_tokens} need "
                                f"{len(prompt) + config.max_new_tokens} positions; this batch's rows hold {rows_hold}")

    def admit_many(self, requests: List[tuple]) -> List[Tuple[Admitted, List[int]]]:
        """`admit` for several (prompts, n, config, seed) at once, their prompts prefilled together: all or none."""
        for prompts, _, config, _ in requests:
            self.check(prompts, config)
        needed = sum(len(prompts) * n for prompts, n, _, _ in requests)
        free = [row for row, owner in enumerate(self.owners) if owner is None]
        if len(free) < needed:
            raise ValueError(f"{needed} rows asked for, {len(free)} free of {self.capacity}")
        logits, kept = self.prefill([prompt for prompts, _, _, _ in requests for prompt in prompts])
        admitted_all, prompt_number = [], 0
        try:  # all or none: a failure part way frees every row taken so far
            for prompts, n, config, seed in requests:
                rows, free = free[: len(prompts) * n], free[len(prompts) * n :]
                generator = None
                if seed is not None and config.do_sample:
                    generator = torch.Generator(device=self.device).manual_seed(seed)
                admitted = Admitted(rows, config, logits_processors(without_penalty(config)), generator)
                scores = logits[prompt_number : prompt_number + len(prompts)].repeat_interleave(n, 0)
                admitted_all.append((admitted, scores))
                for number, prompt in enumerate(prompts):
                    for row in rows[number * n : (number + 1) * n]:
                        self.owners[row] = admitted
                        self.cache.fill_row(row, kept[prompt_number + number], len(prompt))
                        self.positions[row] = len(prompt)
                        self.seen[row] = False
                        self.seen[row, prompt] = True
                self.penalty[rows] = config.repetition_penalty
                prompt_number += len(prompts)
            firsts = [self.choose(scores, admitted.rows) for admitted, scores in admitted_all]
        except BaseException:
            for admitted, _ in admitted_all:
                self.release(admitted)
            raise
        for (admitted, _), first in zip(admitted_all, firsts):
            self.tokens[admitted.rows] = first
        return [(admitted, first.tolist()) for (admitted, _), first in zip(admitted_all, firsts)]

    def prefill(self, prompts: List[List[int]]) -> Tuple[torch.Tensor, List[list]]:
        """Each prompt's next-token logits (prompts, vocab) and what a cache keeps of it: per layer, (keys, values)
        of its last block_size - 1 tokens at most, (groups, kept, head_size) each. Prompts within the window go
        through one left-padded forward; a longer one goes alone, a window at a time."""
        window = self.model.config.block_size
        logits, kept = [None] * len(prompts), [None] * len(prompts)
        together = [number for number, prompt in enumerate(prompts) if len(prompt) <= window]
        for number in sorted(set(range(len(prompts))) - set(together)):
            scorer = CachedScorer(self.model, None, len(prompts[number]) + 1)  # a growing cache of one row
            logits[number] = scorer.prefill(torch.tensor([prompts[number]], device=self.device), None)[0]
            kept[number] = [(keys[0], values[0]) for keys, values in scorer.cache]
        if together:
            length = max(len(prompts[number]) for number in together)
            input_ids = torch.zeros(len(together), length, dtype=torch.long, device=self.device)
            attention_mask = torch.zeros_like(input_ids)
            for row, number in enumerate(together):
                input_ids[row, length - len(prompts[number]) :] = torch.tensor(prompts[number])
                attention_mask[row, length - len(prompts[number]) :] = 1
            padded = not bool(attention_mask.all())
            output = self.model(input_ids, attention_mask=attention_mask if padded else None, use_cache=True,
                                logits_to_keep=1)
            for row, number in enumerate(together):
                logits[number] = output.logits[row, -1].float()
                count = min(len(prompts[number]), output.past_key_values[0][0].shape[2])  # its own tokens, no pads
                kept[number] = [(keys[row, :, -count:], values[row, :, -count:]) for keys, values in output.past_key_values]
        return torch.stack(logits), kept

    def step(self) -> List[Tuple[Admitted, List[int]]]:
        """One token for every busy row: (request, its rows' new tokens) for each request admitted."""
        busy = [row for row, owner in enumerate(self.owners) if owner is not None]
        if not busy:
            return []
        count = self.row_count(busy[-1])
        logits = self.decode_step(
            self.model, self.tokens[:count, None].clone(), self.positions[:count, None].clone(), None,
            self.cache.rows(count),
        )
        self.positions[busy] += 1
        chosen = self.choose(logits, list(range(count)))
        self.tokens[:count] = chosen
        tokens = chosen.tolist()
        requests = list(dict.fromkeys(self.owners[row] for row in busy))
        return [(request, [tokens[row] for row in request.rows]) for request in requests]

    def row_count(self, last_busy_row: int) -> int:
        """The rows [0, count) a step takes: a power of two past the last busy row, at most the capacity."""
        return min(1 << last_busy_row.bit_length(), self.capacity)

    def row_counts(self) -> List[int]:
        """Every row count a step may take."""
        return sorted({self.row_count(row) for row in range(self.capacity)})

    def warm_up(self, rounds: int = 1) -> None:
        """Runs the decode step `rounds` times at every row count while no row is busy: a compiled step compiles
        here, before the first request, not in the middle of one. Call it on the thread that will run `step`
        (CUDA graphs are kept per thread), with rounds=3 under CUDA graphs: torch records a graph on the call
        after its warm-up run."""
        if self.busy():
            raise RuntimeError("warm_up writes into every row; call it before admitting requests")
        for count in self.row_counts():
            positions = torch.zeros(count, 1, dtype=torch.long, device=self.device)
            for _ in range(rounds):
                self.decode_step(self.model, positions.clone(), positions, None, self.cache.rows(count))

    def reset(self) -> None:
        """Frees every row (after a failure that left the caller unsure which requests still hold one)."""
        self.owners = [None] * self.capacity

    def release(self, admitted: Admitted) -> None:
        """Frees a request's rows (their cache is overwritten when they are next admitted)."""
        for row in admitted.rows:
            if self.owners[row] is admitted:
                self.owners[row] = None

    def choose(self, scores: torch.Tensor, rows: List[int]) -> torch.Tensor:
        """The next token of each of `rows` (scores[i] is row rows[i]'s): repetition penalty, then the most
        likely token, or for a sampling request a draw from its processed distribution."""
        index = torch.tensor(rows, device=self.device)
        owners = [self.owners[row] for row in rows]
        if any(owner is not None and owner.config.repetition_penalty != 1.0 for owner in owners):
            penalty = self.penalty[index][:, None]  # transformers' rule, on each token the sequence holds
            penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen[index], penalized, scores)
        chosen = scores.argmax(dim=-1)
        draws = {}
        for i, owner in enumerate(owners):
            if owner is not None and owner.config.do_sample:
                draws.setdefault(owner.sampling_key, (owner, []))[1].append(i)
        for owner, members in draws.values():
            picked = torch.tensor(members, device=self.device)
            probabilities = F.softmax(owner.warpers(None, scores[picked]), dim=-1)
            chosen[picked] = torch.multinomial(probabilities, 1, generator=owner.generator).squeeze(1)
        self.seen[index, chosen] = True
        return chosen


def without_penalty(config: GenerationConfig) -> GenerationConfig:
    plain = copy.deepcopy(config)
    plain.repetition_penalty = 1.0
    return plain
