"""transformers' beam search, all prompts and beams as one batch, in its named phases.

Each step extends every running beam by every token, keeps the 2 * num_beams best
candidates (more with several eos tokens, so num_beams of them can still run on), moves
candidates that end (eos or the length limit) into a per-prompt list of the num_beams best
finished hypotheses, scored log p / generated_length ** length_penalty, and continues the
num_beams best unfinished ones. A prompt is done when no running beam can beat its worst
finished hypothesis (early_stopping=False: judged at the current length; "never": at the
best reachable length), or, with early_stopping=True, as soon as it has num_beams finished
hypotheses. Every step scores all beams in one forward pass and reorders the cache with one
index_select.
"""

from dataclasses import dataclass
from typing import List, Union

import torch
import torch.nn.functional as F

from picogpt_lightning.generation.decode import extend_mask

# transformers' "impossible" beam score: finite, so sums and orderings stay well defined
IMPOSSIBLE = -1.0e9


@dataclass
class BeamSettings:
    """What stays fixed during one search."""

    batch: int
    num_beams: int
    prompt_len: int
    max_length: int
    n_candidates: int
    eos_tokens: torch.Tensor
    length_penalty: float
    early_stopping: Union[bool, str]
    do_sample: bool


@dataclass
class BeamState:
    """Running beams and finished hypotheses of every prompt, each (batch, num_beams, ...)."""

    running: torch.Tensor  # token ids, (batch, num_beams, max_length)
    running_scores: torch.Tensor  # summed log-probabilities
    finished: torch.Tensor  # the best finished hypotheses, best first
    finished_scores: torch.Tensor  # length-penalised scores
    is_finished: torch.Tensor  # whether each slot holds a hypothesis yet
    finished_lengths: torch.Tensor  # generated tokens of each hypothesis
    can_improve: torch.Tensor  # (batch, 1): may a running beam still beat the worst finished one?


def init_beam_state(input_ids: torch.Tensor, settings: BeamSettings, fill: int) -> BeamState:
    batch, num_beams, device = settings.batch, settings.num_beams, input_ids.device
    running = torch.full((batch, num_beams, settings.max_length), fill, dtype=torch.long, device=device)
    running[:, :, : settings.prompt_len] = input_ids[:, None, :]
    # all beams start as copies of the prompt: only the first may extend it, or they would all pick the same tokens
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = IMPOSSIBLE
    return BeamState(
        running=running,
        running_scores=running_scores,
        finished=running.clone(),
        finished_scores=torch.full((batch, num_beams), IMPOSSIBLE, device=device),
        is_finished=torch.zeros(batch, num_beams, dtype=torch.bool, device=device),
        finished_lengths=torch.zeros(batch, num_beams, dtype=torch.long, device=device),
        can_improve=torch.ones(batch, 1, dtype=torch.bool, device=device),
    )


def top_k_continuations(totals: torch.Tensor, settings: BeamSettings):
    """The n_candidates best (or sampled) extensions over all beams of a prompt, best first: (scores, flat ids)."""
    if settings.do_sample:
        picked = torch.multinomial(F.softmax(totals, dim=-1), num_samples=settings.n_candidates)
        candidate_scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
        return candidate_scores, picked.gather(1, order)
    return torch.topk(totals, settings.n_candidates, dim=-1)


def update_running_beams(state: BeamState, candidates, candidate_scores, ends, settings: BeamSettings) -> torch.Tensor:
    """The best candidates that did not end run on; returns the index of each one among the candidates."""
    alive_scores = candidate_scores + ends.float() * IMPOSSIBLE
    keep = torch.topk(alive_scores, settings.num_beams, dim=-1).indices
    state.running = candidates.gather(1, keep[:, :, None].expand(-1, -1, settings.max_length))
    state.running_scores = alive_scores.gather(1, keep)
    return keep


def update_finished_beams(state: BeamState, candidates, candidate_scores, ends, generated: int, settings: BeamSettings):
    """Merges the candidates that ended among the top num_beams into each prompt's list of the best."""
    final_scores = candidate_scores / (generated**settings.length_penalty)
    list_is_full = state.is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
    final_scores = final_scores + list_is_full.float() * IMPOSSIBLE
    final_scores = final_scores + (~state.can_improve).float() * IMPOSSIBLE
    # only the top num_beams candidates may finish, as in transformers
    may_finish = torch.arange(settings.n_candidates, device=ends.device) < settings.num_beams
    just_finished = ends & may_finish[None, :]
    final_scores = final_scores + (~just_finished).float() * IMPOSSIBLE
    best = torch.topk(torch.cat((state.finished_scores, final_scores), dim=1), settings.num_beams, dim=-1).indices
    state.finished = torch.cat((state.finished, candidates), dim=1).gather(
        1, best[:, :, None].expand(-1, -1, settings.max_length)
    )
    state.finished_scores = torch.cat((state.finished_scores, final_scores), dim=1).gather(1, best)
    state.is_finished = torch.cat((state.is_finished, just_finished), dim=1).gather(1, best)
    lengths = torch.full_like(just_finished, generated, dtype=torch.long)
    state.finished_lengths = torch.cat((state.finished_lengths, lengths), dim=1).gather(1, best)


def update_can_improve(state: BeamState, generated: int, max_new_tokens: int, settings: BeamSettings) -> None:
    """Whether each prompt's best running beam can still beat its worst finished hypothesis."""
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_reachable_length = max_new_tokens
    else:
        best_reachable_length = generated
    best_running = state.running_scores[:, :1] / (best_reachable_length**settings.length_penalty)
    worst_finished = torch.where(state.is_finished, state.finished_scores.min(dim=1, keepdim=True).values, IMPOSSIBLE)
    state.can_improve = state.can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)


def is_done(state: BeamState, ends: torch.Tensor, settings: BeamSettings) -> bool:
    all_lists_full = bool(state.is_finished.all()) and settings.early_stopping is True
    return not bool(state.can_improve.any()) or all_lists_full or bool(ends.all())


def finalize(state: BeamState, num_return_sequences: int, settings: BeamSettings) -> torch.Tensor:
    """The first num_return_sequences hypotheses of each prompt (the lists are sorted best first)."""
    sequences = state.finished[:, :num_return_sequences].reshape(-1, settings.max_length)
    longest = int(state.finished_lengths[:, :num_return_sequences].max())
    return sequences[:, : settings.prompt_len + longest]


def beam_log_probs(scorer, processors, input_ids, attention_mask, rows, beam_mask, first: bool, num_beams: int):
    """Processed log-probabilities of every beam's next token, (batch * num_beams, vocab)."""
    if first:
        # all beams hold the same prompt: run it once per prompt and copy its cache to the beams
        logits = scorer.prefill(input_ids, attention_mask).repeat_interleave(num_beams, dim=0)
        batch = input_ids.shape[0]
        scorer.select_rows(torch.arange(batch, device=input_ids.device).repeat_interleave(num_beams))
    else:
        logits = scorer.decode_one_token(rows, beam_mask)
    return processors(rows, F.log_softmax(logits, dim=-1), counted_positions=beam_mask)


def beam_search(
    input_ids, attention_mask, scorer, processors, max_new_tokens: int, eos: List[int], pad_token_id,
    num_beams: int, num_return_sequences: int, length_penalty: float, early_stopping, do_sample: bool,
) -> torch.Tensor:
    """transformers' beam search; returns (batch * num_return_sequences, prompt + longest hypothesis)."""
    batch, prompt_len = input_ids.shape
    settings = BeamSettings(
        batch=batch, num_beams=num_beams, prompt_len=prompt_len, max_length=prompt_len + max_new_tokens,
        n_candidates=max(2, 1 + len(eos)) * num_beams,
        eos_tokens=torch.tensor(eos, device=input_ids.device, dtype=torch.long),
        length_penalty=length_penalty, early_stopping=early_stopping, do_sample=do_sample,
    )
    # without eos every hypothesis reaches max_length: nothing to fill
    state = init_beam_state(input_ids, settings, fill=pad_token_id if eos else -1)
    row_offsets = torch.arange(batch, device=input_ids.device)[:, None] * num_beams
    beam_mask = None if attention_mask is None else attention_mask.repeat_interleave(num_beams, dim=0)
    for cur_len in range(prompt_len, settings.max_length):
        rows = state.running[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        log_probs = beam_log_probs(
            scorer, processors, input_ids, attention_mask, rows, beam_mask, cur_len == prompt_len, num_beams
        )
        vocab_size = log_probs.shape[-1]
        totals = (log_probs.view(batch, num_beams, vocab_size) + state.running_scores[:, :, None]).view(batch, -1)

        candidate_scores, picked = top_k_continuations(totals, settings)
        source_beam, token = picked // vocab_size, picked % vocab_size
        candidates = state.running.gather(1, source_beam[:, :, None].expand(-1, -1, settings.max_length)).clone()
        candidates[:, :, cur_len] = token
        ends = torch.isin(token, settings.eos_tokens) | (cur_len + 1 >= settings.max_length)

        keep = update_running_beams(state, candidates, candidate_scores, ends, settings)
        scorer.select_rows((source_beam.gather(1, keep) + row_offsets).view(-1))
        generated = cur_len + 1 - prompt_len
        update_finished_beams(state, candidates, candidate_scores, ends, generated, settings)
        update_can_improve(state, generated, max_new_tokens, settings)
        if is_done(state, ends, settings):
            break
        beam_mask = extend_mask(beam_mask)
    return finalize(state, num_return_sequences, settings)
