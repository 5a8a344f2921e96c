"""PadCollator: dynamic right padding, masks and pre-shifted labels, against a loop written out here."""

import math
import random

import pytest
import torch

from picogpt_lightning.data.collate import PadCollator


def reference_batch(samples, pad, width):
    """The batch written out position by position: input t is token t, its label is token t + 1."""
    input_ids, mask, labels = [], [], []
    for s in samples:
        s = [int(token) for token in s]
        real = len(s) - 1
        input_ids.append([s[t] if t < real else pad for t in range(width)])
        mask.append([1 if t < real else 0 for t in range(width)])
        labels.append([s[t + 1] if t < real else -100 for t in range(width)])
    return {k: torch.tensor(v) for k, v in [("input_ids", input_ids), ("attention_mask", mask), ("labels", labels)]}


def random_samples(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, 100) for _ in range(rng.randint(2, 20))] for _ in range(n)]


@pytest.mark.parametrize("pad_token_id", [0, 7])
def test_padding_masks_and_shifted_labels_match_the_reference(pad_token_id):
    samples = random_samples(9)
    batch = PadCollator(pad_token_id=pad_token_id)(samples)
    width = max(len(s) for s in samples) - 1  # dynamic: as wide as the longest input, no wider
    expected = reference_batch(samples, pad_token_id, width)
    assert batch.keys() == expected.keys()
    for key in expected:
        assert batch[key].dtype == torch.long
        assert torch.equal(batch[key], expected[key]), key


def test_tensor_samples_and_none_pad_id():
    samples = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10]), [11, 12, 13]]
    batch = PadCollator(pad_token_id=None)(samples)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [9, 0, 0], [11, 12, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[6, 7, 8], [10, -100, -100], [12, 13, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_pad_to_multiple_of(multiple):
    samples = random_samples(5, seed=multiple)
    batch = PadCollator(pad_token_id=3, pad_to_multiple_of=multiple)(samples)
    longest = max(len(s) for s in samples) - 1
    width = math.ceil(longest / multiple) * multiple
    expected = reference_batch(samples, 3, width)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.parametrize("as_rows", [True, False], ids=["list of rows", "one 2-D tensor"])
def test_equal_lengths_carry_no_mask(as_rows):
    # no padding anywhere: no mask, so the model takes its causal-only path without looking at one
    samples = torch.arange(30).view(3, 10)
    batch = PadCollator()(list(samples) if as_rows else samples)
    assert batch.keys() == {"input_ids", "labels"}
    assert torch.equal(batch["input_ids"], samples[:, :-1])
    assert torch.equal(batch["labels"], samples[:, 1:])


def test_equal_lengths_widened_to_the_multiple_get_a_mask():
    samples = torch.arange(30).view(3, 10)  # inputs of 9 tokens, bucketed to 16
    batch = PadCollator(pad_to_multiple_of=16)(samples)
    expected = reference_batch(samples.tolist(), 0, 16)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.parametrize(("longest", "expected_width"), [(5, 8), (9, 10), (10, 10)])
def test_bucketing_never_pads_past_max_length(longest, expected_width):
    samples = [list(range(1, longest + 2)), [1, 2, 3]]
    batch = PadCollator(pad_to_multiple_of=8, max_length=10)(samples)
    expected = reference_batch(samples, 0, expected_width)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.parametrize(
    ("samples", "match"),
    [([[1, 2], [3]], "sample 1"), ([[1, 2], []], "sample 1"), ([], "empty batch"), ([[[1, 2]]], "1-D")],
)
def test_bad_samples(samples, match):
    with pytest.raises(ValueError, match=match) as info:
        PadCollator()(samples)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"), [
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"max_length": 0}, "max_length"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PadCollator(**kwargs)
