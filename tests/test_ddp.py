"""Data parallelism: 2-process DDP on CPU follows the same trajectory as one process with twice the batch.

Blocks-mode batches hold equal token counts, so the mean of the ranks' mean losses is the global
mean, and DDP's gradient average is the gradient of the global batch: in fp32 the two runs may
differ only by float rounding.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_corpus
from ddp_run import DDP_RUNS, train
from tiny_training import step_losses

TESTS_DIR = Path(__file__).resolve().parent
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    corpus = shared_corpus()  # module scope: the corpus_path fixture is per test
    if corpus is None:
        pytest.skip("tiny_shakespeare not found: set PICOGPT_DATA to a local input.txt")
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(TESTS_DIR / "ddp_run.py"), "--corpus", str(corpus), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference_losses, reference_weights, _ = train(corpus, devices=1, batch_size=8)
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
