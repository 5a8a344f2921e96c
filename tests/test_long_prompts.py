"""Work and memory bounded by the window: chunked prefill, incremental streaming.

The references are second code paths: one forward pass over the whole prompt (today's prefill,
its sliding-window mask written out by the model), decoding without a cache (use_cache=False:
every step reruns the whole sequence), and the tokenizer decoding the whole text at once.
"""

import random

import pytest
import torch

from picogpt_lightning import PicoGPT
from picogpt_lightning.generation import TextStream
from picogpt_lightning.generation.decode import CachedScorer
from picogpt_lightning.model import masks
from picogpt_lightning.tokenizer import build_tokenizer
from tiny_training import tiny_config

BLOCK = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PicoGPT(tiny_config(vocab_size=50, block_size=BLOCK)).eval()


def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [1, BLOCK - 1, BLOCK])
@pytest.mark.parametrize("cache", [None, "static"])
def test_a_prompt_within_the_window_is_one_pass_as_before(model, length, cache):
    ids = prompt(length)
    with torch.no_grad():
        logits = CachedScorer(model, cache, length + 4).prefill(ids, None)
        assert torch.equal(logits, model(ids, logits_to_keep=1).logits[:, -1].float())  # one pass, the last position


@pytest.mark.parametrize("length", [BLOCK + 1, 3 * BLOCK, 5 * BLOCK + 7])
@pytest.mark.parametrize("cache", [None, "static"])
def test_a_long_prompt_in_chunks_gives_the_sliding_windows_logits_and_tokens(model, length, cache):
    ids = prompt(length)
    with torch.no_grad():
        chunked = CachedScorer(model, cache, length + 8).prefill(ids, None)
        torch.testing.assert_close(chunked, model(ids).logits[:, -1].float(), rtol=1e-5, atol=1e-5)  # one pass, (T, T) mask
        tokens = model.generate(ids, max_new_tokens=8, cache_implementation=cache)
        reference = model.generate(ids, max_new_tokens=8, use_cache=False)  # the whole sequence every step
    assert torch.equal(tokens, reference)


def test_left_padded_long_prompts_in_chunks_match_decoding_without_a_cache(model):
    ids = prompt(4 * BLOCK + 3, batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[0, : BLOCK + 5] = 0  # the first prompt is shorter, padded on the left past a whole window
    with torch.no_grad():
        for cache in (None, "static"):
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation=cache)
            reference = model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False)
            assert torch.equal(tokens, reference)


def test_prefill_never_attends_over_more_than_two_windows(model, monkeypatch):
    widths = []
    build = masks.attention_mask_for

    def recording(attention_mask, cache_position, key_positions, window, contiguous):
        widths.append((cache_position.shape[0], key_positions.shape[0]))
        return build(attention_mask, cache_position, key_positions, window, contiguous)

    monkeypatch.setattr("picogpt_lightning.model.gpt.attention_mask_for", recording)
    with torch.no_grad():
        model.generate(prompt(20 * BLOCK), max_new_tokens=2)
    assert max(queries for queries, _ in widths) == BLOCK and max(keys for _, keys in widths) < 2 * BLOCK


# ---- streaming text, decoded incrementally -------------------------------------------------------


class CountingTokenizer:
    """A tokenizer whose decode counts the ids it is given per call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []
        self.bos_token_id = tokenizer.bos_token_id

    def decode(self, ids):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids)


TEXT = "Ünïcödé wörds — and plain ones; 東京 is ✓ 🙂 too.\n" * 8


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("show_prompt", [True, False])
def test_the_streamed_text_is_the_whole_text_decoded_with_constant_work_per_token(kind, show_prompt):
    tokenizer = build_tokenizer(kind, TEXT, **({"vocab_size": 300} if kind == "bpe" else {}))
    ids = tokenizer.encode(TEXT)
    rng = random.Random(0)
    new = [rng.randrange(tokenizer.vocab_size - 1) for _ in range(400)]  # any ids: split characters, bytes alone
    new = [token for token in new if token != tokenizer.eos_token_id]
    counting, written = CountingTokenizer(tokenizer), []
    stream = TextStream(counting, written.append, show_prompt=show_prompt)
    stream.put(torch.tensor([ids[:30]]))
    for token in new:
        stream.put(torch.tensor([token]))
    stream.end()
    whole = tokenizer.decode(ids[:30] + new)
    expected = whole if show_prompt else whole[len(tokenizer.decode(ids[:30])):]
    assert "".join(written) == expected
    assert max(counting.calls[4:]) <= 12  # after the prompt, a few tokens per decode, however long the text



@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_served_row_decodes_and_matches_stops_with_constant_work_per_token(kind):
    from picogpt_lightning.commands.serve_worker import Row

    tokenizer = build_tokenizer(kind, TEXT, **({"vocab_size": 300} if kind == "bpe" else {}))
    ids = tokenizer.encode(TEXT * 3)
    stop = "🙂 too.\nÜnï"  # first found after dozens of tokens, across token boundaries
    counting = CountingTokenizer(tokenizer)
    row = Row(0, "", len(ids), [stop, "never there"], "")
    sent = "".join(row.add(token, counting, None) for token in ids if row.finish_reason is None)
    whole = tokenizer.decode(ids)
    assert (sent, row.finish_reason) == (whole[: whole.find(stop)], "stop")  # the whole text decoded, cut at the stop
    assert max(counting.calls) <= 12
