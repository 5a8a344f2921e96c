"""FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU processes: clipped training that matches one
process with the global batch, and a checkpoint that PicoGPT.from_checkpoint reads.

Gradient norms are clipped by the module (`configure_gradient_clipping`) over the sharded
DTensor gradients; the clip value is small enough that every step is clipped, so a run whose
norm were taken per shard, or not at all, would leave the single-process trajectory.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_run import train
from picogpt_lightning import PicoGPT

TESTS_DIR = Path(__file__).resolve().parent
CLIP = 0.05
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus_path):
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, str(TESTS_DIR / "fsdp_run.py"), "--corpus", str(corpus_path), "--out", str(out)]
    result = subprocess.run(command + ["--clip", str(CLIP)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return corpus_path, out


def test_sharded_clipped_training_matches_one_process_and_its_checkpoint_loads(fsdp_run):
    corpus, out = fsdp_run
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and record["weights"] == "DTensor"  # really sharded
    reference_losses, reference_weights, _ = train(corpus, devices=1, batch_size=8, gradient_clip_val=CLIP)
    _, unclipped_weights, _ = train(corpus, devices=1, batch_size=8, gradient_clip_val=None)

    assert record["losses"] == pytest.approx(reference_losses, abs=TOLERANCE)
    loaded = PicoGPT.from_checkpoint(str(out / "fsdp.ckpt")).state_dict()
    assert loaded.keys() == reference_weights.keys()
    for name, reference in reference_weights.items():
        torch.testing.assert_close(loaded[name], reference, atol=TOLERANCE, rtol=0, msg=name)
    # clipping moves the weights well past the tolerance (Adam undoes most of a uniform rescaling, not
    # all), so agreeing above means the sharded run clipped, and by the global norm, not per shard
    moved = max((reference_weights[n] - unclipped_weights[n]).abs().max() for n in reference_weights)
    assert moved > 10 * TOLERANCE


@pytest.fixture(scope="module")
def fsdp_qlora_run(tmp_path_factory, corpus_path):
    """The same FSDP2 run training QLoRA adapters on a briefly trained tiny model."""
    out = tmp_path_factory.mktemp("fsdp_qlora")
    _, _, trainer = train(corpus_path, devices=1, batch_size=8)
    trainer.save_checkpoint(out / "base.ckpt")
    command = [sys.executable, str(TESTS_DIR / "fsdp_run.py"), "--corpus", str(corpus_path), "--out", str(out), "--clip", str(CLIP)]
    result = subprocess.run(command + ["--lora_base", str(out / "base.ckpt")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return corpus_path, out


def test_sharded_qlora_training_matches_one_process_and_its_checkpoint_holds_the_adapters(fsdp_qlora_run):
    corpus, out = fsdp_qlora_run
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and record["weights"] == "DTensor"  # the adapters really sharded
    reference_losses, reference_weights, _ = train(
        corpus, devices=1, batch_size=8, gradient_clip_val=CLIP, lora_base=str(out / "base.ckpt")
    )
    assert record["losses"] == pytest.approx(reference_losses, abs=TOLERANCE)
    stored = torch.load(out / "fsdp.ckpt", weights_only=True)["state_dict"]
    adapters = {name: tensor for name, tensor in reference_weights.items() if ".lora_" in name}
    assert stored.keys() == {f"model.{name}" for name in adapters}  # the frozen NF4 base is not stored
    for name, reference in adapters.items():
        torch.testing.assert_close(stored[f"model.{name}"], reference, atol=TOLERANCE, rtol=0, msg=name)
    PicoGPT.from_checkpoint(str(out / "fsdp.ckpt"))  # folds onto the base it names
