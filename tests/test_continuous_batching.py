"""Continuous batching (generation/continuous.py over model/row_cache.py): requests join a running batch and
leave it step by step; each must get the tokens `generate` gives it alone, and the compiled step must keep its
graphs while rows come and go."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from factories import randomize
from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.errors import UserError
from picogpt_lightning.generation import resolve_generation_config
from picogpt_lightning.generation.compiled import CompiledDecodeSteps
from picogpt_lightning.generation.continuous import ContinuousBatch

# (prompt, n, max_new_tokens, seed, settings): greedy; seeded sampling of two rows from a prompt past block_size
# (prefilled a window at a time, decoded past the ring's wrap); a repetition penalty; seeded top-p with a penalty
REQUESTS = [
    ([1, 2, 3], 1, 30, None, {}),
    (list(range(5, 23)) + [2], 2, 25, 7, dict(do_sample=True, temperature=0.8, top_k=10)),
    ([4], 1, 12, None, dict(repetition_penalty=1.3)),
    ([9, 9], 3, 20, 3, dict(do_sample=True, top_p=0.9, repetition_penalty=1.2)),
    ([7, 1], 1, 6, None, {}),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = PicoGPTConfig(vocab_size=40, block_size=16, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)
    return randomize(PicoGPT(config).eval())


def alone(model, prompt, n, max_new_tokens, seed, settings) -> list:
    """`generate` on this request alone: the reference."""
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, num_return_sequences=n, **settings)
    return output[:, len(prompt):].tolist()


def run_staggered(batch: ContinuousBatch, every: int = 3):
    """Admits one request every `every` steps while the earlier ones decode; each leaves after its max_new_tokens.
    Returns each request's rows' tokens and the row counts the steps used."""
    tokens, handles, pending, counts = {}, {}, list(range(len(REQUESTS))), set()
    step = 0
    while pending or batch.busy():
        if pending and step % every == 0:
            number = pending.pop(0)
            prompt, n, max_new_tokens, seed, settings = REQUESTS[number]
            config = resolve_generation_config(max_new_tokens=max_new_tokens, **settings)
            handle, first = batch.admit([prompt], n, config, seed)
            handles[handle], tokens[number] = number, [[token] for token in first]
        busy = [row for row, owner in enumerate(batch.owners) if owner is not None]
        if busy:
            counts.add(min(1 << busy[-1].bit_length(), batch.capacity))
        for handle, new in batch.step():
            number = handles[handle]
            for row, token in zip(tokens[number], new):
                row.append(token)
            if len(tokens[number][0]) >= REQUESTS[number][2]:
                batch.release(handle)
        step += 1
    return {number: [row[: REQUESTS[number][2]] for row in rows] for number, rows in tokens.items()}, counts


@torch.no_grad()
def test_each_request_gets_the_tokens_it_gets_alone_while_others_join_and_leave(model):
    got, counts = run_staggered(ContinuousBatch(model, 8))
    assert len(counts) > 1  # the batch grew and shrank
    for number, request in enumerate(REQUESTS):
        assert got[number] == alone(model, *request), number


@torch.no_grad()
def test_rows_joining_and_leaving_do_not_recompile_the_decode_step(model):
    """One graph per row count (a power of two); joining, leaving and the ring's wrap compile nothing more."""
    counter = CompileCounter()
    batch = ContinuousBatch(model, 8, CompiledDecodeSteps(counter, None, None))
    got, counts = run_staggered(batch)
    assert counter.frame_count == len(counts) and len(counts) >= 2
    again, counts_again = run_staggered(batch, every=2)  # other arrival times: other rows join and leave
    assert counts_again <= counts and counter.frame_count == len(counts) and again == got
    assert got == {number: alone(model, *request) for number, request in enumerate(REQUESTS)}


@torch.no_grad()
def test_a_request_that_needs_more_rows_than_are_free_is_refused_and_takes_none(model):
    batch = ContinuousBatch(model, 2)
    config = resolve_generation_config(max_new_tokens=4, do_sample=True)
    batch.admit([[1, 2]], 1, config)
    with pytest.raises(ValueError, match="2 rows asked for, 1 free of 2"):
        batch.admit([[3], [4]], 1, config)
    assert batch.free_rows() == 1


def decode_to_the_end(batch: ContinuousBatch, started: dict, requests: list) -> dict:
    """Steps until every admitted request (handle -> (number, its rows' tokens so far)) has its max_new_tokens."""
    while batch.busy():
        for handle, new in batch.step():
            number, rows = started[handle]
            for row, token in zip(rows, new):
                row.append(token)
            if len(rows[0]) == requests[number][2]:
                batch.release(handle)
    return {number: rows for number, rows in started.values()}


@torch.no_grad()
def test_rows_sized_below_the_window_hold_sequences_up_to_max_length(model):
    """A long-window model keeps only max_length slots a row; sequences within it decode as alone."""
    batch = ContinuousBatch(model, 4, max_length=12)
    assert batch.cache.layers[0].keys.shape[2] == 12 < model.config.block_size
    with pytest.raises(UserError, match="need 13 positions; this batch's rows hold 12"):
        batch.admit([[1, 2, 3]], 1, resolve_generation_config(max_new_tokens=10))
    assert batch.free_rows() == 4
    requests = [([1, 2, 3], 1, 9, None, {}), ([9, 9], 2, 10, 3, dict(do_sample=True, top_p=0.9))]
    started = {}
    for number, (prompt, n, max_new_tokens, seed, settings) in enumerate(requests):
        config = resolve_generation_config(max_new_tokens=max_new_tokens, **settings)
        handle, first = batch.admit([prompt], n, config, seed)
        started[handle] = (number, [[token] for token in first])
    for number, rows in decode_to_the_end(batch, started, requests).items():
        assert rows == alone(model, *requests[number])


@torch.no_grad()
def test_requests_admitted_together_share_one_padded_prefill_and_each_gets_its_tokens_alone(model):
    """Prompts of different lengths prefilled in one left-padded forward (the one past block_size alone)."""
    batch = ContinuousBatch(model, 8)
    configs = [resolve_generation_config(max_new_tokens=max_new, **settings) for _, _, max_new, _, settings in REQUESTS]
    admitted = batch.admit_many([([prompt], n, config, seed) for (prompt, n, _, seed, _), config in zip(REQUESTS, configs)])
    started = {handle: (number, [[token] for token in first]) for number, (handle, first) in enumerate(admitted)}
    for number, rows in decode_to_the_end(batch, started, REQUESTS).items():
        assert rows == alone(model, *REQUESTS[number]), number
