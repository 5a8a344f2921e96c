"""The teacher -> distill recipe chain on tiny settings: distill.yaml reads the teacher's best checkpoint."""

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from picogpt_lightning.lightning_cli import run_lightning

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_flags(corpus_path: Path, steps: int) -> list:
    """The recipes' shapes shrunk for a test; the config's logger save_dir ("runs") is kept."""
    return [
        "--model.init_args.config.n_layer", "1",
        "--model.init_args.config.n_embd", "32",
        "--model.init_args.config.n_head", "2",
        "--model.init_args.config.block_size", "32",
        "--model.init_args.warmup_steps", "1",
        "--model.init_args.lr_decay_steps", str(steps),
        "--data.init_args.data_path", str(corpus_path),
        "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "4",
        "--data.init_args.train_samples", str(4 * steps),
        "--data.init_args.val_samples", "16",
        "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


@pytest.fixture
def teacher_run(tmp_path, corpus_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' relative runs/ paths land in the test's directory
    # a high learning rate with dropout over few steps: val/loss need not fall at the last check
    cli = run_lightning(["fit", "--config", str(CONFIGS / "teacher.yaml"), *tiny_flags(corpus_path, 6),
                         "--model.init_args.learning_rate", "0.03", "--model.init_args.min_lr", "0.03"])
    return cli, tmp_path


def test_distill_reads_the_teachers_best_checkpoint_and_starts_from_it(teacher_run, corpus_path):
    cli, root = teacher_run
    log_dir = Path(cli.trainer.log_dir).resolve()
    assert log_dir == (root / "runs" / "teacher" / "version_0").resolve()

    # the best by val/loss, judged from the TensorBoard events: its step is the one best.ckpt holds
    events = EventAccumulator(str(log_dir))
    events.Reload()
    val = [(event.value, event.step) for event in events.Scalars("val/loss")]
    assert len(val) == 3  # steps 2, 4, 6
    best_loss, best_step = min(val)
    best = log_dir / "checkpoints" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=False)
    assert saved["global_step"] == best_step + 1  # events count from 0, the checkpoint after the step
    assert saved["callbacks"][next(k for k in saved["callbacks"] if k.startswith("ModelCheckpoint"))][
        "best_model_score"
    ].item() == pytest.approx(best_loss)

    # distill.yaml's teacher and tokenizer are exactly that file
    distill = yaml.safe_load((CONFIGS / "distill.yaml").read_text(encoding="utf-8"))
    for read in (distill["model"]["init_args"]["teacher"], distill["data"]["init_args"]["tokenizer"]):
        assert (root / read).resolve() == best.resolve()

    student = run_lightning(["fit", "--config", str(CONFIGS / "distill.yaml"), *tiny_flags(corpus_path, 2)])
    assert student.trainer.global_step == 2
    teacher_weights = {key[len("model."):]: value for key, value in saved["state_dict"].items()}
    loaded = student.model.teacher.state_dict()
    assert loaded.keys() == teacher_weights.keys()
    assert all(torch.equal(loaded[key], teacher_weights[key]) for key in loaded)
    assert Path(student.trainer.log_dir).resolve() == (root / "runs" / "distill" / "version_0").resolve()
