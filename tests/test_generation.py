"""PicoGPT.generate against transformers' generate on the same weights, and against formulas."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from transformers import CompileConfig

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.hf import to_hf
from picogpt_lightning.model.cache import StaticKVCache
from picogpt_lightning.generation import (
    decode_step_for,
    logits_processors,
    next_token_logits,
    resolve_generation_config,
)


def process(scores, sequences, counted_positions=None, min_tokens_to_keep=1, **options):
    """The project's logits processing for these generation options, as generate applies it."""
    processors = logits_processors(resolve_generation_config(**options), min_tokens_to_keep)
    return processors(sequences, scores, counted_positions=counted_positions)


def apply_repetition_penalty(scores, sequences, penalty, counted_positions=None):
    return process(scores, sequences, counted_positions, repetition_penalty=penalty)


def top_k_filter(scores, top_k, min_tokens_to_keep=1):
    return process(scores, scores.long(), None, min_tokens_to_keep, do_sample=True, top_k=top_k)


def top_p_filter(scores, top_p, min_tokens_to_keep=1):
    return process(scores, scores.long(), None, min_tokens_to_keep, do_sample=True, top_p=top_p)


def LogitsProcessor(do_sample, temperature, top_k, top_p, repetition_penalty):  # noqa: N802 - the old name
    options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty)
    return lambda scores, sequences: process(scores, sequences, **options)

VOCAB = 40
PROMPT_PAD = 1  # the token under left padding (masked out, so its value must not matter)
PAD = 2  # what finished sequences are filled with
NEW_TOKENS = 16


def peaked_model(seed: int = 0, **overrides) -> PicoGPT:
    """A tiny random model with sharp next-token distributions: ties between top tokens are
    then far beyond float rounding, so two implementations must agree token for token."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)
    model = PicoGPT(PicoGPTConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    return model


@pytest.fixture(scope="module")
def models():
    model = peaked_model()
    return model, to_hf(model)


@pytest.fixture(scope="module")
def padded_batch():
    """Three prompts of 4, 6 and 7 tokens, left-padded to 7."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[1, :1] = 0
    return input_ids.masked_fill(attention_mask == 0, PROMPT_PAD), attention_mask


def a_likely_eos(model, input_ids, attention_mask) -> int:
    """A token greedy decoding of the first prompt emits at its 5th step, so eos really ends sequences."""
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5)
    return int(greedy[0, -1])


# The caches the parity tests run with. "static" goes through dynamo's fullgraph capture of
# the decode step, run by the eager backend: the same graph inductor compiles, without a
# C++ build per shape (test_inductor_compiled_static_cache_... runs inductor itself).
CACHES = {
    "dynamic": dict(),
    "static": dict(cache_implementation="static", compile_config=CompileConfig(backend="eager", mode=None)),
}
with_each_cache = pytest.mark.parametrize("cache", list(CACHES))


def hf_generate(llama, input_ids, attention_mask, **options):
    options.setdefault("eos_token_id", None)
    return llama.generate(input_ids, attention_mask=attention_mask, pad_token_id=PAD, **options)


# ---- token for token against transformers -------------------------------------------------

DECODING_CASES = [
    dict(num_beams=1),
    dict(num_beams=3),
    dict(num_beams=4),
    dict(num_beams=4, num_return_sequences=3),
    dict(num_beams=3, repetition_penalty=1.5),
    dict(num_beams=1, repetition_penalty=1.3),
]


@with_each_cache
@pytest.mark.parametrize("with_eos", [False, True], ids=["no-eos", "eos"])
@pytest.mark.parametrize("options", DECODING_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_greedy_and_beam_search_equal_transformers(models, padded_batch, options, with_eos, cache):
    model, llama = models
    input_ids, attention_mask = padded_batch
    options = dict(options)
    if with_eos:
        options["eos_token_id"] = a_likely_eos(model, input_ids, attention_mask)
    ours = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, **options, **CACHES[cache]
    )
    theirs = hf_generate(llama, input_ids, attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, **options)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    if with_eos:  # the case is only meaningful if some sequence did end
        assert (ours[:, input_ids.shape[1] :] == options["eos_token_id"]).any()


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=4, early_stopping=True, num_return_sequences=2),
        dict(num_beams=4, early_stopping="never", length_penalty=2.0),
        dict(num_beams=4, early_stopping=False, length_penalty=-1.0),
        dict(num_beams=3, num_return_sequences=3, length_penalty=0.0),
    ],
    ids=["early-true", "never-lp2", "false-lp-1", "lp0"],
)
@with_each_cache
def test_beam_search_stopping_rules_equal_transformers(padded_batch, options, cache):
    for seed in range(3):  # several models: the rules differ only when hypotheses end at different lengths
        model = peaked_model(seed)
        llama = to_hf(model)
        input_ids, attention_mask = padded_batch
        eos = a_likely_eos(model, input_ids, attention_mask)
        ours = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=PAD,
            **options, **CACHES[cache],
        )
        theirs = hf_generate(llama, input_ids, attention_mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, **options)
        assert ours.shape == theirs.shape
        assert torch.equal(ours, theirs)


def test_early_stopping_never_with_two_eos_tokens_equals_transformers(padded_batch):
    """A case where "never" (judge running beams at the best reachable length) finds better,
    longer hypotheses than False does, with two eos tokens widening the candidate pool."""
    model = peaked_model(seed=4)
    llama = to_hf(model)
    input_ids, attention_mask = padded_batch
    options = dict(max_new_tokens=30, num_beams=3, length_penalty=2.0, eos_token_id=[21, 22])
    results = {}
    for early_stopping in ("never", False):
        ours = model.generate(input_ids, attention_mask=attention_mask, early_stopping=early_stopping, pad_token_id=PAD, **options)
        theirs = hf_generate(llama, input_ids, attention_mask, early_stopping=early_stopping, **options)
        assert torch.equal(ours, theirs)
        results[early_stopping] = ours
    assert not torch.equal(results["never"], results[False])


@with_each_cache
def test_unpadded_batch_without_mask_equals_transformers(models, cache):
    model, llama = models
    input_ids = torch.randint(3, VOCAB, (2, 5))
    for num_beams in (1, 4):
        ours = model.generate(input_ids, max_new_tokens=NEW_TOKENS, num_beams=num_beams, **CACHES[cache])
        theirs = llama.generate(input_ids, max_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=0),
        dict(temperature=0.7, top_k=10, top_p=0.9),
        dict(top_k=5, repetition_penalty=1.2, num_return_sequences=2),
        dict(num_beams=3, top_k=8, top_p=0.8, temperature=1.5, num_return_sequences=2),
        dict(num_beams=2, top_k=1, eos_token_id=5),  # beam sampling keeps 2 tokens even with top_k=1
    ],
    ids=["plain", "t-k-p", "k-rep-nrs2", "beam-sample", "beam-sample-k1"],
)
@with_each_cache
def test_seeded_sampling_is_reproducible_and_equals_transformers(padded_batch, options, cache):
    input_ids, attention_mask = padded_batch
    # flatter distributions than the other tests', so that sampling really has choices to make
    model = peaked_model(seed=3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.div_(3)
    llama = to_hf(model)

    def sample(generate, **cache_options):
        torch.manual_seed(7)
        return generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=True, pad_token_id=PAD,
            **options, **cache_options,
        )

    first, second = sample(model.generate, **CACHES[cache]), sample(model.generate, **CACHES[cache])
    assert torch.equal(first, second)
    assert torch.equal(first, sample(llama.generate))


def test_different_seeds_draw_different_samples(models, padded_batch):
    model, _ = models
    input_ids, attention_mask = padded_batch
    draws = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        draws.append(model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=2.0))
    assert not torch.equal(draws[0], draws[1])


# ---- behaviour of our own code paths ---------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(num_beams=4, num_return_sequences=2), dict(do_sample=True, top_k=5)])
def test_cached_decoding_equals_uncached(models, padded_batch, options):
    model, _ = models
    input_ids, attention_mask = padded_batch
    eos = a_likely_eos(model, input_ids, attention_mask)
    caches = [
        dict(use_cache=False),
        dict(use_cache=True),
        dict(cache_implementation="static", disable_compile=True),  # the debugging path: no torch.compile
        CACHES["static"],
    ]
    results = []
    for cache_options in caches:
        torch.manual_seed(3)
        results.append(
            model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                **options, **cache_options,
            )
        )
    for result in results[1:]:
        assert torch.equal(result, results[0])


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(use_cache=False)], ids=["greedy", "beam", "no-cache"])
def test_prefill_projects_only_the_last_position_and_tokens_equal_full_forwards(models, padded_batch, options):
    model, _ = models
    input_ids, attention_mask = padded_batch
    projected = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: projected.append(args[0].shape[1]))
    try:
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, **options)
    finally:
        hook.remove()
    assert projected and set(projected) == {1}  # every forward, the prompt's too, projects one position
    if options:
        return
    # the reference: greedy over the full forward's logits, every position projected, no cache
    sequences, mask = input_ids, attention_mask
    with torch.no_grad():
        for _ in range(6):
            token = model(sequences, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            sequences, mask = torch.cat((sequences, token), 1), torch.cat((mask, torch.ones_like(token)), 1)
    assert torch.equal(out, sequences)


# ---- the static cache and the compiled decode step ---------------------------------------------


def test_static_cache_forward_equals_growing_cache(models, padded_batch):
    """PicoGPT.forward over a StaticKVCache, prompt then one token at a time, against the growing cache."""
    model, _ = models
    input_ids, attention_mask = padded_batch
    batch, prompt_len = input_ids.shape
    steps = 4
    tokens = torch.randint(3, VOCAB, (batch, steps))
    max_length = prompt_len + steps + 2  # room left over: unwritten positions must stay invisible
    cache = StaticKVCache(model.config, batch, max_length)
    full_mask = torch.zeros(batch, max_length, dtype=torch.long)
    full_mask[:, :prompt_len] = attention_mask
    with torch.no_grad():
        growing = model(input_ids, attention_mask=attention_mask, use_cache=True)
        static = model(input_ids, attention_mask=full_mask, past_key_values=cache, cache_position=torch.arange(prompt_len))
        torch.testing.assert_close(static.logits, growing.logits)
        mask = attention_mask
        for step in range(steps):
            position = prompt_len + step
            mask = torch.cat((mask, torch.ones(batch, 1, dtype=torch.long)), dim=1)
            full_mask[:, position] = 1
            growing = model(
                tokens[:, step : step + 1], attention_mask=mask, past_key_values=growing.past_key_values, use_cache=True
            )
            static = model(
                tokens[:, step : step + 1], attention_mask=full_mask, past_key_values=cache,
                cache_position=torch.tensor([position]),
            )
            torch.testing.assert_close(static.logits, growing.logits)
    assert static.past_key_values is cache
    for (keys, values), layer in zip(growing.past_key_values, cache.layers):  # written in place, where expected
        torch.testing.assert_close(layer.keys[:, :, : prompt_len + steps], keys)
        torch.testing.assert_close(layer.values[:, :, : prompt_len + steps], values)
        assert not layer.keys[:, :, prompt_len + steps :].any()


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padded"])
def test_decode_step_compiles_once_with_fullgraph_and_never_again(models, padded_batch, padded):
    """One graph (fullgraph=True: a graph break would raise) for all decode steps of a shape:
    no recompilation from one token to the next, nor when generating again with the same shapes."""
    model, _ = models
    input_ids, attention_mask = padded_batch
    if not padded:
        attention_mask = None
    counter = CompileCounter()
    options = dict(max_new_tokens=NEW_TOKENS, cache_implementation="static", compile_config=CompileConfig(backend=counter, mode=None))
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS)
    first = model.generate(input_ids, attention_mask=attention_mask, **options)
    assert counter.frame_count == 1  # NEW_TOKENS - 1 decode steps, one compilation
    second = model.generate(input_ids, attention_mask=attention_mask, **options)
    assert counter.frame_count == 1
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # a new shape (a longer max length) is a new graph, compiled once too
    model.generate(input_ids, attention_mask=attention_mask, **{**options, "max_new_tokens": NEW_TOKENS + 4})
    assert counter.frame_count == 2


def test_decode_step_settings_follow_the_device_and_generation_config():
    """CUDA replays the step as a CUDA graph (reduce-overhead); CPU compiles with inductor's
    default mode; disable_compile runs eagerly; a CompileConfig overrides backend and mode."""
    def settings(device, **options):
        step = decode_step_for(resolve_generation_config(cache_implementation="static", **options), torch.device(device))
        return step if step is next_token_logits else (step.backend, step.mode)

    assert settings("cuda") == ("inductor", "reduce-overhead")
    assert settings("cpu") == ("inductor", None)
    assert settings("cuda", disable_compile=True) is next_token_logits
    assert settings("cpu", compile_config=CompileConfig(backend="eager", mode=None)) == ("eager", None)


def test_inductor_compiled_static_cache_equals_growing_cache(models, padded_batch):
    """The default compiled path (inductor) end to end: greedy and seeded sampling on a left-padded
    batch (one shape, so one compilation: a cold inductor build costs seconds on CPU)."""
    model, _ = models
    input_ids, attention_mask = padded_batch
    for options in (dict(), dict(do_sample=True, top_k=10)):
        results = []
        for cache_options in (dict(), dict(cache_implementation="static")):
            torch.manual_seed(5)
            results.append(
                model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, **options, **cache_options)
            )
        assert torch.equal(results[0], results[1])


@with_each_cache
@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_equals_each_prompt_alone(models, padded_batch, num_beams, cache):
    model, _ = models
    input_ids, attention_mask = padded_batch
    batched = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, num_beams=num_beams, **CACHES[cache]
    )
    for row in range(input_ids.shape[0]):
        prompt = input_ids[row][attention_mask[row].bool()][None]
        alone = model.generate(prompt, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
        assert torch.equal(batched[row, input_ids.shape[1] :], alone[0, prompt.shape[1] :])


def test_finished_sequences_continue_with_pad_and_decoding_stops_when_all_finish(models, padded_batch):
    model, _ = models
    input_ids, attention_mask = padded_batch
    eos = a_likely_eos(model, input_ids, attention_mask)
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=PAD)
    for row in out[:, input_ids.shape[1] :].tolist():
        if eos in row:
            after = row[row.index(eos) + 1 :]
            assert after == [PAD] * len(after)
    # stopping early: the output ends at the step the last sequence emitted eos, or at the limit
    ends = [row.index(eos) + 1 if eos in row else NEW_TOKENS for row in out[:, input_ids.shape[1] :].tolist()]
    assert out.shape[1] == input_ids.shape[1] + max(ends)


def test_pad_token_in_prompt_is_padding_without_a_mask(models, padded_batch):
    """transformers' rule: with no attention_mask, pad_token_id in the prompt marks padding."""
    model, _ = models
    input_ids, attention_mask = padded_batch
    with_mask = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, pad_token_id=PROMPT_PAD)
    inferred = model.generate(input_ids, max_new_tokens=8, pad_token_id=PROMPT_PAD)
    assert torch.equal(with_mask, inferred)


def test_beam_search_runs_all_beams_in_one_forward_per_step(models, padded_batch):
    model, _ = models
    input_ids, attention_mask = padded_batch
    batch_sizes = []
    handle = model.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, num_beams=4)
    finally:
        handle.remove()
    # the prompt once per prompt, then one call per new token for all 3 * 4 beams
    assert batch_sizes == [3] + [12] * 5


def test_streamer_receives_prompt_then_each_token(models):
    model, _ = models

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, ids):
            self.chunks.append(ids.tolist())

        def end(self):
            self.ended = True

    prompt = torch.randint(3, VOCAB, (1, 5))
    recorder = Recorder()
    out = model.generate(prompt, max_new_tokens=6, streamer=recorder)
    assert recorder.chunks[0] == prompt.tolist()
    assert [chunk[0] for chunk in recorder.chunks[1:]] == out[0, 5:].tolist()
    assert recorder.ended


# ---- logits processing against the formulas ----------------------------------------------------


def test_repetition_penalty_formula():
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [0.0, 4.0, -2.0, 1.0, -0.5]])
    sequences = torch.tensor([[0, 1, 1, 4], [2, 3, 3, 3]])
    counted = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # token 4 of row 0 is prompt padding
    penalty = 2.0
    expected = scores.clone()
    for row in range(2):
        seen = {int(t) for t, c in zip(sequences[row], counted[row]) if c}
        for token in seen:
            value = scores[row, token]
            expected[row, token] = value / penalty if value > 0 else value * penalty
    torch.testing.assert_close(apply_repetition_penalty(scores, sequences, penalty, counted), expected)


def test_top_k_formula():
    scores = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    for k in (1, 2, 3, 6):
        filtered = top_k_filter(scores, k)
        for row in range(2):
            kth = sorted(scores[row].tolist(), reverse=True)[k - 1]
            for token, value in enumerate(scores[row].tolist()):
                assert filtered[row, token] == (value if value >= kth else float("-inf"))
    # at least min_tokens_to_keep survive even when top_k asks for fewer
    assert torch.isfinite(top_k_filter(scores, 1, min_tokens_to_keep=2)).sum(dim=-1).tolist() == [3, 2]


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.5, 0.75, 0.92, 0.99, 1.0])
def test_top_p_formula(top_p):
    """Nucleus: keep a token iff the probability of all more likely tokens is below top_p."""
    probs = torch.tensor([[0.45, 0.25, 0.15, 0.1, 0.05], [0.05, 0.6, 0.02, 0.3, 0.03]])
    scores = probs.log()
    filtered = top_p_filter(scores, top_p)
    for row in range(2):
        ranked = sorted(range(5), key=lambda t: -probs[row, t].item())
        mass_before = 0.0
        for position, token in enumerate(ranked):
            keep = mass_before < top_p or position == 0
            assert torch.isfinite(filtered[row, token]).item() == keep, (row, token)
            mass_before += probs[row, token].item()


def test_processor_order_and_sampling_only_options():
    scores = torch.tensor([[2.0, -1.0, 0.5, 1.5]])
    sequences = torch.tensor([[0, 0]])
    greedy = LogitsProcessor(do_sample=False, temperature=0.5, top_k=1, top_p=0.1, repetition_penalty=2.0)
    # without sampling only the repetition penalty applies
    torch.testing.assert_close(greedy(scores, sequences), torch.tensor([[1.0, -1.0, 0.5, 1.5]]))
    sampling = LogitsProcessor(do_sample=True, temperature=0.5, top_k=2, top_p=None, repetition_penalty=2.0)
    # penalty first (2.0 -> 1.0), then temperature (x2), then top-2 of [2, -2, 1, 3]
    expected = torch.tensor([[2.0, float("-inf"), float("-inf"), 3.0]])
    torch.testing.assert_close(sampling(scores, sequences), expected)


def test_sampling_with_top_k_1_is_greedy(models, padded_batch):
    model, _ = models
    input_ids, attention_mask = padded_batch
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS)
    sampled = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1)
    assert torch.equal(greedy, sampled)


def test_temperature_divides_logits_before_sampling():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    processed = LogitsProcessor(do_sample=True, temperature=0.25, top_k=None, top_p=None, repetition_penalty=1.0)
    torch.testing.assert_close(F.softmax(processed(logits, logits.long()), -1), F.softmax(logits * 4, -1))


# ---- argument errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "greedy"),
        (dict(num_beams=0), "num_beams"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
        (dict(eos_token_id=VOCAB), "eos_token_id"),
        (dict(num_beams=2, streamer=object()), "streamer"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(cache_implementation="offloaded"), "cache_implementation"),
        (dict(cache_implementation="static", use_cache=False), "use_cache"),
    ],
)
def test_bad_arguments_raise_one_line_errors(models, options, fragment):
    model, _ = models
    with pytest.raises(ValueError, match=fragment) as error:
        model.generate(torch.randint(0, VOCAB, (2, 5)), **options)
    assert "\n" not in str(error.value)


def test_sampling_options_without_do_sample_are_ignored(models):
    model, _ = models
    prompt = torch.randint(0, VOCAB, (1, 5))
    plain = model.generate(prompt, max_new_tokens=8)
    assert torch.equal(plain, model.generate(prompt, max_new_tokens=8, temperature=0.0, top_k=1, top_p=0.1))
