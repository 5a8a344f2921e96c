"""Data parallelism: 2-process DDP on CPU follows the same trajectory as one process with twice the batch.

Losses are token-weighted across ranks and accumulated micro-batches: the gradient of a step is
that of the global batch's per-token mean, so in fp32 the two runs may differ only by float
rounding, in blocks mode (equal token counts) and with micro-batches of very different counts.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_run import DDP_RUNS, UNEVEN_RUNS, train, uneven_module
from tiny_training import collate, one_sgd_step, step_losses, tiny_teacher, uneven_sequences

TESTS_DIR = Path(__file__).resolve().parent
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, corpus_path):
    out = tmp_path_factory.mktemp("ddp")
    teacher = tiny_teacher(str(out / "teacher.pt"))
    command = [
        sys.executable, str(TESTS_DIR / "ddp_run.py"), "--corpus", str(corpus_path), "--out", str(out), "--teacher", teacher
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference_losses, reference_weights, _ = train(corpus_path, devices=1, batch_size=8)
    return out, reference_losses, reference_weights


@pytest.mark.parametrize("run", list(DDP_RUNS))
def test_ddp_matches_single_process_with_the_global_batch(ddp_results, run):
    out, reference_losses, reference_weights = ddp_results
    record = json.loads((out / run / "losses.json").read_text())
    assert record["world_size"] == 2
    losses = step_losses(record["losses"], DDP_RUNS[run]["accumulate"])

    assert len(losses) == len(reference_losses) == 5
    assert losses == pytest.approx(reference_losses, abs=TOLERANCE)
    assert reference_losses[-1] < reference_losses[0]  # the runs trained, so equal losses mean something
    weights = torch.load(out / run / "weights.pt")
    for name, reference in reference_weights.items():
        torch.testing.assert_close(weights[name], reference, atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.parametrize("kind", UNEVEN_RUNS)
def test_ddp_with_accumulation_weights_every_real_token_alike(ddp_results, kind):
    """Micro-batches of 19, 3, 30 and 8 real tokens, two per rank: the step over all four as one batch."""
    out = ddp_results[0]
    module = uneven_module(kind, str(out / "teacher.pt"))
    one_sgd_step(module, [[collate(sum(uneven_sequences(), []))]], accumulate=1)

    weights = torch.load(out / f"uneven_{kind}" / "weights.pt")
    for name, param in module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(weights[name], param.detach(), atol=1e-6, rtol=0, msg=name)
