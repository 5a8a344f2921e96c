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

The settings are one `transformers.GenerationConfig`; keyword arguments update a copy of
it, as in transformers, and fields it leaves unset take this project's `DEFAULTS`. Logits
are processed by transformers' own processors. Beam search keeps the beams as a batch
dimension: every step scores all beams of all prompts in one forward pass and reorders
the cache with one index_select. Nothing here imports Lightning.

Two KV caches: the growing one (the default: each step concatenates its keys and values)
and, with `cache_implementation="static"`, a preallocated `StaticKVCache` whose decode step
has the same shapes every token, so it is compiled once per (batch, max length) with
`torch.compile(fullgraph=True)` (`disable_compile=True` runs it eagerly).
"""

import copy
import functools
from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from picogpt_lightning.model.cache import StaticKVCache

# transformers' "impossible" beam score: finite, so sums and orderings stay well defined
IMPOSSIBLE = -1.0e9

# what an unset GenerationConfig field means here (transformers' own top_k default is 50; here None is no top-k)
DEFAULTS = dict(
    max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
    num_beams=1, num_return_sequences=1, length_penalty=1.0, early_stopping=False, use_cache=True,
    disable_compile=False,
)
# cache_implementation: None (or "dynamic") is the growing cache, "static" the preallocated one
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


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
    eos = normalize_eos(config.eos_token_id)
    pad_token_id = config.pad_token_id
    input_ids = input_ids.long()
    if pad_token_id is None and eos:
        pad_token_id = eos[0]  # finished sequences are filled with eos, as transformers does
    if attention_mask is None:
        attention_mask = padding_mask_from_pad_token(input_ids, pad_token_id, eos)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the model's unmasked path is faster and identical
    num_beams, num_return_sequences = config.num_beams, config.num_return_sequences
    # beam sampling keeps room for a non-eos continuation, as transformers does
    processors = logits_processors(config, min_tokens_to_keep=1 + max(1, len(eos)) if num_beams > 1 else 1)
    if config.cache_implementation == "static":
        max_length = input_ids.shape[1] + config.max_new_tokens
        scorer = StaticCacheScorer(model, max_length, decode_step_for(config, input_ids.device))
    else:
        scorer = NextTokenScorer(model, config.use_cache)
    common = dict(
        scorer=scorer, processors=processors, max_new_tokens=config.max_new_tokens, eos=eos,
        pad_token_id=pad_token_id, do_sample=config.do_sample,
    )
    if num_beams == 1:
        if num_return_sequences > 1:  # independent samples of each prompt
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        return greedy_or_sample(input_ids, attention_mask, streamer=streamer, **common)
    return beam_search(
        input_ids, attention_mask, num_beams=num_beams, num_return_sequences=num_return_sequences,
        length_penalty=config.length_penalty, early_stopping=config.early_stopping, **common,
    )


# ---- settings and inputs ----------------------------------------------------------------


def resolve_generation_config(generation_config: Optional[GenerationConfig] = None, **kwargs) -> GenerationConfig:
    """A copy of `generation_config` (or a fresh one) updated by `kwargs`, unset fields filled from DEFAULTS."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ValueError(
            f"generation_config must be a transformers.GenerationConfig, got {type(generation_config).__name__}"
        )
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unknown = sorted(name for name in kwargs if not hasattr(config, name))
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; see transformers.GenerationConfig for the names")
    for name, value in kwargs.items():
        setattr(config, name, value)
    for name, value in DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    return config


def normalize_eos(eos_token_id) -> List[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(token) for token in eos_token_id]


def validate_inputs(model_config, config: GenerationConfig, input_ids, attention_mask, streamer) -> None:
    """One-line ValueErrors naming the argument; sampling arguments are checked only when sampling.

    transformers' own `GenerationConfig.validate` runs last, for the combinations it knows.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be a 2-D integer tensor (batch, prompt length)")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per prompt, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    max_new_tokens = config.max_new_tokens
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model_config.block_size:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's block_size {model_config.block_size}; shorten the prompt or lower max_new_tokens"
        )
    if config.do_sample:
        if not config.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {config.temperature!r} (use do_sample=False for greedy)"
            )
        if config.top_k is not None and (not isinstance(config.top_k, int) or config.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 or None: no top-k), got {config.top_k!r}")
        if config.top_p is not None and not 0.0 <= config.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {config.top_p!r}")
    if not config.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0: no penalty), got {config.repetition_penalty!r}")
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.num_beams == 1 and not config.do_sample and config.num_return_sequences > 1:
        raise ValueError("greedy decoding returns one sequence per prompt; use do_sample=True or num_beams > 1")
    if config.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {config.early_stopping!r}")
    pad = [] if config.pad_token_id is None else [config.pad_token_id]
    for name, tokens in (("eos_token_id", normalize_eos(config.eos_token_id)), ("pad_token_id", pad)):
        for token in tokens:
            if not 0 <= token < model_config.vocab_size:
                raise ValueError(f"{name} {token} is outside the vocabulary [0, {model_config.vocab_size})")
    if config.cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation must be None or 'dynamic' (the growing cache) or 'static', "
            f"got {config.cache_implementation!r}"
        )
    if config.cache_implementation == "static" and not config.use_cache:
        raise ValueError("cache_implementation='static' is a KV cache: it needs use_cache=True")
    if streamer is not None and config.num_beams > 1:
        raise ValueError("a streamer shows one token per step and cannot follow beam search; use num_beams=1")
    try:
        config.validate()
    except ValueError as error:
        raise ValueError(str(error).strip().splitlines()[0]) from None


def padding_mask_from_pad_token(input_ids, pad_token_id, eos) -> Optional[torch.Tensor]:
    """transformers' inference: pad tokens in the prompt are padding, unless pad is also an eos token."""
    if pad_token_id is None or pad_token_id in eos or not bool((input_ids == pad_token_id).any()):
        return None
    return (input_ids != pad_token_id).long()


# ---- logits processing: transformers' processors ---------------------------------------------


def logits_processors(config: GenerationConfig, min_tokens_to_keep: int = 1) -> LogitsProcessorList:
    """transformers' processing of next-token scores, in its order: repetition penalty, then
    (sampling only) temperature, top-k, top-p. Call as processors(sequences, scores, counted_positions=mask)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(PaddingAwareRepetitionPenalty(config.repetition_penalty))
    if config.do_sample:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k, min_tokens_to_keep=min_tokens_to_keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep=min_tokens_to_keep))
    return processors


class PaddingAwareRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty, with prompt padding left out of "already in the sequence".

    transformers' processor counts every id in the sequence, so a pad id that is also a real
    token would be penalised for padding; here uncounted positions point at one extra score
    column, penalised and dropped again. Kept by hand for that correctness only.
    """

    def __init__(self, penalty: float):
        self.penalty = RepetitionPenaltyLogitsProcessor(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, counted_positions=None) -> torch.Tensor:
        if counted_positions is None:
            return self.penalty(input_ids, scores)
        vocab_size = scores.shape[-1]
        tokens = input_ids.masked_fill(counted_positions == 0, vocab_size)
        padded_scores = torch.cat((scores, scores.new_zeros(scores.shape[0], 1)), dim=-1)
        return self.penalty(tokens, padded_scores)[:, :vocab_size]


# ---- scoring the next token ---------------------------------------------------------------


class NextTokenScorer:
    """Logits of the next token of growing sequences, via the KV cache or by recomputing everything.

    With the cache, each call feeds only the tokens the cache has not seen yet.
    """

    def __init__(self, model, use_cache: bool):
        self.model = model
        self.use_cache = use_cache
        self.cache = None

    def __call__(self, sequences: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.use_cache:
            return self.model(sequences, attention_mask=attention_mask).logits[:, -1].float()
        seen = self.cache[0][0].shape[2] if self.cache else 0
        output = self.model(
            sequences[:, seen:], attention_mask=attention_mask, past_key_values=self.cache, use_cache=True
        )
        self.cache = output.past_key_values
        return output.logits[:, -1].float()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps cache row rows[i] as row i (beam search following its surviving beams)."""
        if self.cache:
            self.cache = tuple((keys[rows], values[rows]) for keys, values in self.cache)


def next_token_logits(model, input_ids, cache_position, attention_mask, cache: StaticKVCache) -> torch.Tensor:
    """One forward pass over the static cache: the float logits of each row's last token."""
    output = model(input_ids, attention_mask=attention_mask, past_key_values=cache, cache_position=cache_position)
    return output.logits[:, -1].float()


def decode_step_for(config: GenerationConfig, device: torch.device):
    """`next_token_logits` compiled (or not, with disable_compile=True) as the config asks.

    By default with inductor, and on CUDA with mode="reduce-overhead" so that a step
    replays as one CUDA graph; a transformers `CompileConfig` in `compile_config` picks
    the backend, mode and options. fullgraph=True always: the step has no graph break.
    """
    if config.disable_compile:
        return next_token_logits
    compile_config = config.compile_config
    if compile_config is None:
        backend, mode, options = "inductor", ("reduce-overhead" if device.type == "cuda" else None), None
    else:
        backend, mode, options = compile_config.backend, compile_config.mode, compile_config.options
    return CompiledDecodeSteps(backend, mode, options)


class CompiledDecodeSteps:
    """One compiled `next_token_logits` per (batch, max_length), each with its own dynamo cache.

    dynamo keeps one list of compiled graphs per function and, with fullgraph=True, fails
    once that list holds recompile_limit (8) graphs; generating with many prompt lengths
    must not, so each shape gets its own region (torch.compile's isolate_recompiles).
    """

    def __init__(self, backend, mode, options):
        self.backend, self.mode, self.options = backend, mode, options
        self.cuda_graphs = mode == "reduce-overhead"

    def __call__(self, model, input_ids, cache_position, attention_mask, cache: StaticKVCache) -> torch.Tensor:
        options = tuple(sorted((self.options or {}).items()))  # hashable, for compiled_step's cache
        step = compiled_step(cache.batch_size, cache.max_length, self.backend, self.mode, options)
        if self.cuda_graphs:
            # a new step: the previous replay's outputs may be overwritten; keep this step's logits
            torch.compiler.cudagraph_mark_step_begin()
            return step(model, input_ids, cache_position, attention_mask, cache).clone()
        return step(model, input_ids, cache_position, attention_mask, cache)


@functools.lru_cache(maxsize=64)
def compiled_step(batch: int, max_length: int, backend, mode, options: tuple):
    return torch.compile(
        next_token_logits, fullgraph=True, dynamic=False, backend=backend, mode=mode,
        options=dict(options) or None, isolate_recompiles=True,
    )


class StaticCacheScorer:
    """Next-token logits over a StaticKVCache: the prompt in one eager pass (its length varies
    from call to call), then one `decode_step` per token, with the same shapes every step.

    Called as NextTokenScorer is, with the sequences so far and their (growing) mask; the
    mask is copied into a (batch, max_length) buffer whose unwritten positions stay 0.
    """

    use_cache = True

    def __init__(self, model, max_length: int, decode_step):
        self.model, self.max_length, self.decode_step = model, max_length, decode_step
        self.cache: Optional[StaticKVCache] = None
        self.mask: Optional[torch.Tensor] = None
        self.length = 0

    def __call__(self, sequences: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, length = sequences.shape
        device = sequences.device
        if self.cache is None:
            weight = self.model.lm_head.weight
            self.cache = StaticKVCache(self.model.config, batch, self.max_length, device, weight.dtype)
            step, tokens, positions = next_token_logits, sequences, torch.arange(length, device=device)
        else:
            assert length == self.length + 1, "a static cache decodes one token per call after the prompt"
            step, tokens, positions = self.decode_step, self.last_tokens(sequences), torch.tensor([length - 1], device=device)
        self.length = length
        return step(self.model, tokens, positions, self.full_mask(attention_mask, batch, length), self.cache)

    @staticmethod
    def last_tokens(sequences: torch.Tensor) -> torch.Tensor:
        # a fresh (batch, 1) tensor: a slice would carry the sequences' row stride, which
        # grows every step and which dynamo guards on (a recompilation per token)
        return sequences[:, -1:].clone(memory_format=torch.contiguous_format)

    def full_mask(self, attention_mask: Optional[torch.Tensor], batch: int, length: int) -> Optional[torch.Tensor]:
        if attention_mask is None:
            return None
        if self.mask is None or self.mask.shape[0] != batch:
            self.mask = attention_mask.new_zeros(batch, self.max_length)
        self.mask[:, :length] = attention_mask
        return self.mask

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps cache row rows[i] as row i (beam search following its surviving beams)."""
        self.cache.select_rows(rows)


def extend_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask after one more (real) token."""
    if attention_mask is None:
        return None
    return torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), dim=1)


# ---- greedy and sampling ------------------------------------------------------------------


def greedy_or_sample(
    input_ids, attention_mask, scorer, processors, max_new_tokens, eos, pad_token_id, do_sample, streamer
):
    """One token per step: the most likely one, or a draw from the processed distribution."""
    sequences = input_ids
    eos_tokens = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        scores = processors(sequences, scorer(sequences, attention_mask), counted_positions=attention_mask)
        if do_sample:
            next_tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if eos:
            next_tokens = torch.where(unfinished, next_tokens, pad_token_id)  # finished: pad
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


# ---- beam search --------------------------------------------------------------------------


def beam_search(
    input_ids, attention_mask, scorer, processors, max_new_tokens, eos, pad_token_id,
    num_beams, num_return_sequences, length_penalty, early_stopping, do_sample,
):
    """transformers' beam search, all prompts and beams as one batch of batch * num_beams rows.

    Each step extends every running beam by every token, keeps the 2 * num_beams best
    candidates (more with several eos tokens, so num_beams of them can still run on),
    moves candidates that end (eos or the length limit) into a per-prompt list of the
    num_beams best finished hypotheses, scored log p / generated_length ** length_penalty,
    and continues the num_beams best unfinished ones. A prompt is done when no running
    beam can beat its worst finished hypothesis (early_stopping=False: judged at the
    current length; "never": at the best reachable length), or, with early_stopping=True,
    as soon as it has num_beams finished hypotheses.
    """
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    max_length = prompt_len + max_new_tokens
    n_candidates = max(2, 1 + len(eos)) * num_beams
    eos_tokens = torch.tensor(eos, device=device, dtype=torch.long)
    fill = pad_token_id if eos else -1  # without eos every hypothesis reaches max_length: nothing to fill

    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None, :]
    # all beams start as copies of the prompt: only the first may extend it, or they would all pick the same tokens
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = IMPOSSIBLE
    finished = running.clone()
    finished_scores = torch.full((batch, num_beams), IMPOSSIBLE, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    finished_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_candidates = torch.arange(n_candidates, device=device) < num_beams  # only these may finish
    row_offsets = torch.arange(batch, device=device)[:, None] * num_beams

    beam_mask = None if attention_mask is None else attention_mask.repeat_interleave(num_beams, dim=0)
    for cur_len in range(prompt_len, max_length):
        rows = running[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        if cur_len == prompt_len and scorer.use_cache:
            # all beams hold the same prompt: run it once per prompt and copy its cache to the beams
            logits = scorer(input_ids, attention_mask).repeat_interleave(num_beams, dim=0)
            scorer.select_rows(torch.arange(batch, device=device).repeat_interleave(num_beams))
        else:
            logits = scorer(rows, beam_mask)
        log_probs = processors(rows, F.log_softmax(logits, dim=-1), counted_positions=beam_mask)
        vocab_size = log_probs.shape[-1]
        totals = (log_probs.view(batch, num_beams, vocab_size) + running_scores[:, :, None]).view(batch, -1)

        # candidates: the n_candidates best (or sampled) extensions over all beams of a prompt, best first
        if do_sample:
            picked = torch.multinomial(F.softmax(totals, dim=-1), num_samples=n_candidates)
            candidate_scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            candidate_scores, picked = torch.topk(totals, n_candidates, dim=-1)
        source_beam, token = picked // vocab_size, picked % vocab_size
        candidates = running.gather(1, source_beam[:, :, None].expand(-1, -1, max_length)).clone()
        candidates[:, :, cur_len] = token
        ends = torch.isin(token, eos_tokens) | (cur_len + 1 >= max_length)

        # running beams: the best candidates that did not end
        alive_scores = candidate_scores + ends.float() * IMPOSSIBLE
        keep = torch.topk(alive_scores, num_beams, dim=-1).indices
        running = candidates.gather(1, keep[:, :, None].expand(-1, -1, max_length))
        running_scores = alive_scores.gather(1, keep)
        scorer.select_rows((source_beam.gather(1, keep) + row_offsets).view(-1))

        # finished hypotheses: merge the candidates that ended among the top num_beams into the best list
        generated = cur_len + 1 - prompt_len
        final_scores = candidate_scores / (generated**length_penalty)
        list_is_full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        final_scores = final_scores + list_is_full.float() * IMPOSSIBLE
        final_scores = final_scores + (~can_improve).float() * IMPOSSIBLE
        just_finished = ends & top_candidates[None, :]
        final_scores = final_scores + (~just_finished).float() * IMPOSSIBLE
        best = torch.topk(torch.cat((finished_scores, final_scores), dim=1), num_beams, dim=-1).indices
        finished = torch.cat((finished, candidates), dim=1).gather(1, best[:, :, None].expand(-1, -1, max_length))
        finished_scores = torch.cat((finished_scores, final_scores), dim=1).gather(1, best)
        is_finished = torch.cat((is_finished, just_finished), dim=1).gather(1, best)
        lengths = torch.full_like(just_finished, generated, dtype=torch.long)
        finished_lengths = torch.cat((finished_lengths, lengths), dim=1).gather(1, best)

        # can the best running beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_reachable_length = max_new_tokens
        else:
            best_reachable_length = generated
        best_running = running_scores[:, :1] / (best_reachable_length**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, IMPOSSIBLE)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_lists_full = bool(is_finished.all()) and early_stopping is True
        if not bool(can_improve.any()) or all_lists_full or bool(ends.all()):
            break
        beam_mask = extend_mask(beam_mask)

    # the lists are sorted best first: the first num_return_sequences of each prompt
    sequences = finished[:, :num_return_sequences].reshape(batch * num_return_sequences, max_length)
    longest = int(finished_lengths[:, :num_return_sequences].max())
    return sequences[:, : prompt_len + longest]
