"""Token-weighted losses: a step's loss is the mean over every real token of the step.

One optimizer step over accumulated micro-batches of different real-token counts must
move the weights exactly as one step over the same sequences in a single batch, and as a
plain autograd step on that batch without Lightning. Plain SGD (no momentum) makes the
weights' change -lr * gradient, so comparing weights compares gradients. The 2-process
DDP case is in tests/test_ddp.py.
"""

import copy

import pytest
import torch

from tiny_training import (
    SGD_LR, SGDLanguageModel, collate, distillation_module, one_sgd_step, seed_everything, tiny_config,
    tiny_teacher, uneven_sequences,
)

TOLERANCE = 1e-6


def build(kind: str, tmp_path):
    if kind == "lm":
        seed_everything()
        return SGDLanguageModel(tiny_config())
    return distillation_module(tiny_teacher(str(tmp_path / "teacher.pt")))


def sgd_step_by_hand(module, micro_batches, weights) -> dict:
    """One SGD step on sum_i weights[i] * (mean loss of micro-batch i), with autograd alone."""
    module = copy.deepcopy(module).train()
    for batch, weight in zip(micro_batches, weights):
        losses, _ = module.compute_losses(batch)
        (weight * losses["loss"]).backward()
    with torch.no_grad():
        for param in module.parameters():
            if param.grad is not None:
                param -= SGD_LR * param.grad
    return trained_weights(module)


def trained_weights(module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def largest_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("kind", ["lm", "distill"])
def test_accumulated_micro_batches_step_like_one_batch_of_both(kind, tmp_path):
    first, second = uneven_sequences()[:2]  # 19 and 3 real tokens, padded to different lengths
    micro_batches = [collate(first), collate(second)]
    both = collate(first + second)
    module = build(kind, tmp_path)

    accumulated = copy.deepcopy(module)
    one_sgd_step(accumulated, [micro_batches], accumulate=2)
    single = copy.deepcopy(module)
    one_sgd_step(single, [[both]], accumulate=1)
    reference = sgd_step_by_hand(module, [both], [1.0])

    assert largest_difference(trained_weights(accumulated), trained_weights(single)) < TOLERANCE
    assert largest_difference(trained_weights(single), reference) < TOLERANCE
    # the weighting matters on these batches: the mean of the two micro-batch means steps elsewhere
    mean_of_means = sgd_step_by_hand(module, micro_batches, [0.5, 0.5])
    assert largest_difference(mean_of_means, reference) > 1e-3
