"""Exact resume, interruptions, non-finite losses, safe loading and short command-line errors."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.callbacks import LastCheckpoint, RandomStateCheckpoint
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.modules.base import warmup_cosine
from test_checkpoints import Planted  # a pickle that touches a file when it is unpickled
from tiny_training import BLOCK_SIZE, LossRecorder, quiet_trainer, seed_everything, step_losses, tiny_config

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*val_dataloader")


# ---- exact resume ---------------------------------------------------------------------------


def train(corpus, root, max_steps, ckpt_path=None, accumulate=1, mode="blocks", group_by_length=False, decay=40):
    """Per-micro-batch losses of a tiny run with dropout (so the random state matters); last.ckpt in root."""
    seed_everything()
    model = LanguageModelModule(tiny_config(dropout=0.1), warmup_steps=5, lr_decay_steps=decay)
    # 96 windows of 4: 24 batches an epoch, so 40 steps cross epochs and 20 stops inside one
    data = TinyShakespeareDataModule(
        data_path=str(corpus), block_size=BLOCK_SIZE, batch_size=4, train_samples=96, val_samples=8, seed=7,
        mode=mode, group_by_length=group_by_length,
    )
    recorder = LossRecorder()
    trainer = quiet_trainer(
        max_steps=max_steps, accumulate_grad_batches=accumulate, enable_checkpointing=True, default_root_dir=root,
        callbacks=[recorder, RandomStateCheckpoint(), LastCheckpoint(dirpath=str(root))],
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return step_losses(recorder.losses, accumulate)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(mode="speeches", group_by_length=True), dict(accumulate=2)],
    ids=["blocks", "speeches_grouped", "accumulate2"],
)
def test_twenty_then_resume_to_forty_equals_forty_straight(corpus_path, tmp_path, options):
    straight = train(corpus_path, tmp_path / "straight", 40, **options)
    first = train(corpus_path, tmp_path / "split", 20, **options)
    assert checkpoints.load(tmp_path / "split" / "last.ckpt").global_step == 20
    rest = train(corpus_path, tmp_path / "split2", 40, ckpt_path=str(tmp_path / "split" / "last.ckpt"), **options)
    assert len(straight) == 40 and len(first) == 20 and len(rest) == 20
    assert first + rest == straight  # loss for loss, bit for bit


def test_schedule_length_is_kept_when_max_steps_changes(corpus_path, tmp_path):
    train(corpus_path, tmp_path / "a", 20, decay=None)  # the schedule spans this run's 20 steps
    with pytest.warns(UserWarning, match="spans 20 steps; keeping it"):
        seed_everything()
        model = LanguageModelModule(tiny_config(), warmup_steps=5, learning_rate=1e-3, min_lr=1e-4)
        data = TinyShakespeareDataModule(data_path=str(corpus_path), block_size=BLOCK_SIZE, batch_size=4, train_samples=96, seed=7)
        trainer = quiet_trainer(max_steps=22)
        trainer.fit(model, datamodule=data, ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * warmup_cosine(22, 5, 20, 0.1))  # min_lr: the 20-step schedule has ended


# ---- the command line: signals, non-finite losses, errors, concurrent runs -----------------------


def write_config(tmp_path, corpus, model=None, data=None, **trainer) -> Path:
    """A tiny fit recipe in tmp_path/tiny.yaml; `model`, `data` and `trainer` override its init_args."""
    config = {
        "model": {"class_path": "picogpt_lightning.modules.LanguageModelModule", "init_args": {
            "config": {"block_size": BLOCK_SIZE, "n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 32, "dropout": 0.1},
            "warmup_steps": 5, "lr_decay_steps": 40, **(model or {})}},
        "data": {"class_path": "picogpt_lightning.data.TinyShakespeareDataModule", "init_args": {
            "data_path": str(corpus), "block_size": BLOCK_SIZE, "batch_size": 4, "train_samples": 96, "val_samples": 8,
            **(data or {})}},
        "trainer": {"accelerator": "cpu", "max_steps": 40, "val_check_interval": 10, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 5,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}}, **trainer},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_command(config: Path, *args: str, log: Path = None, pause: float = 0.0):
    command = [sys.executable, "-m", "picogpt_lightning", "fit", "--config", str(config), *args]
    if log is not None:
        command += ["--trainer.callbacks+=reliability_helpers.LossLog",
                    f"--trainer.callbacks.path={log}", f"--trainer.callbacks.pause={pause}"]
    return command


def environment():
    path = os.pathsep.join([str(REPO_ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PICOGPT_DEBUG": "", "OMP_NUM_THREADS": "1"}


def logged_losses(log: Path):
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_step_exits_non_zero_and_resumes_exactly(corpus_path, tmp_path, signum, exit_code):
    config = write_config(tmp_path, corpus_path)
    straight_log, first_log, rest_log = tmp_path / "straight.jsonl", tmp_path / "first.jsonl", tmp_path / "rest.jsonl"
    subprocess.run(fit_command(config, log=straight_log), check=True, capture_output=True, cwd=tmp_path, env=environment())

    process = subprocess.Popen(fit_command(config, log=first_log, pause=0.2), cwd=tmp_path, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (not first_log.exists() or len(first_log.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    steps_done = len(first_log.read_text().splitlines())
    assert 5 <= steps_done < 40
    saved = list((tmp_path / "runs").glob(f"tiny/version_*/checkpoints/interrupted-step={steps_done}.ckpt"))
    assert len(saved) == 1 and checkpoints.load(saved[0]).global_step == steps_done
    assert checkpoints.load(saved[0].parent / "last.ckpt").global_step == steps_done  # last.ckpt is the last state
    resume_line = [line for line in stderr.splitlines() if line.startswith("resume with: ")][-1]
    assert resume_line.endswith(f"--ckpt_path {saved[0]}")

    # the printed command is the first one plus --ckpt_path; run as printed (logging elsewhere, without
    # the pause), it continues where the first run stopped
    printed = shlex.split(resume_line.removeprefix("resume with: "))
    first_command = fit_command(config, log=first_log, pause=0.2)
    assert printed == ["python", "-m", "picogpt_lightning", *first_command[3:], "--ckpt_path", str(saved[0])]
    resume = [sys.executable] + [arg.replace(str(first_log), str(rest_log)).replace("pause=0.2", "pause=0.0") for arg in printed[1:]]
    subprocess.run(resume, check=True, capture_output=True, cwd=tmp_path, env=environment())
    assert logged_losses(first_log) + logged_losses(rest_log) == logged_losses(straight_log)


def test_non_finite_loss_stops_with_one_line_and_no_nan_checkpoint(corpus_path, tmp_path):
    config = write_config(tmp_path, corpus_path, val_check_interval=1)
    result = subprocess.run(
        fit_command(config, "--model.init_args.learning_rate=1e6", "--model.init_args.warmup_steps=0",
                    "--nonfinite_check.check_every_n_steps=1000"),
        capture_output=True, text=True, cwd=tmp_path, env=environment(),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "non-finite" in error_lines[0], result.stderr
    step = int(error_lines[0].split(" step ")[1].split(";")[0])
    last_good = error_lines[0].split("Last good checkpoint: ")[1].split(". ")[0]
    assert 0 < checkpoints.load(last_good).global_step < step  # named, and from before the divergence
    for path in (tmp_path / "runs").rglob("*.ckpt"):
        assert all(torch.isfinite(t).all() for t in checkpoints.load(path).state_dict.values()), path


def short_error(tmp_path, *args) -> str:
    result = subprocess.run(fit_command(*args), capture_output=True, text=True, cwd=tmp_path, env=environment())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error:"), result.stderr
    return lines[-1]


# bad inputs the cases below name ({tmp} is the test's directory)
BAD_FILES = {
    "typo.yaml": "data:\n  init_args:\n    batch_sise: 3\n",
    "broken.yaml": "trainer:\n  max_steps: [1\n  val: 2\n",
    "truncated.ckpt": b"PK\x03\x04 not a whole checkpoint",
}
# each case: (its arguments after the config, what its one error line must contain)
CLI_ERRORS = {
    "flag-typo": (["--trainer.max_stepz=3"], "did you mean 'trainer.max_steps'"),
    "model-flag-typo": (["--model.init_args.learning_rat=3"], "did you mean 'model.learning_rate'"),
    "config-flag-typo": (["--model.init_args.config.n_heads=3"], "did you mean 'model.config.n_head'"),
    "yaml-key-typo": (["--config", "{tmp}/typo.yaml"], "did you mean 'data.batch_size'"),
    "broken-yaml": (["--config", "{tmp}/broken.yaml"], "{tmp}/broken.yaml, line "),
    "vocab-size": (["--model.init_args.config.vocab_size=100"], "vocab_size is 100"),
    "missing-ckpt": (["--ckpt_path", "{tmp}/missing.ckpt"], "{tmp}/missing.ckpt"),
    "truncated-ckpt": (["--ckpt_path", "{tmp}/truncated.ckpt"], "{tmp}/truncated.ckpt"),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_errors_are_short(corpus_path, tmp_path, case):
    config = write_config(tmp_path, corpus_path)
    for name, content in BAD_FILES.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    arguments, expected = CLI_ERRORS[case]
    error = short_error(tmp_path, config, *(argument.format(tmp=tmp_path) for argument in arguments))
    assert expected.format(tmp=tmp_path) in error
    assert not any((tmp_path / "runs").glob("tiny/version_*"))  # nothing was created


@pytest.mark.parametrize(
    "args",
    [
        ["--data.init_args.data_path", "missing.txt"],  # the data module, before the Trainer exists
        ["--trainer.strategy", "no_such_strategy"],  # the Trainer's own construction
        ["--model.init_args.init_from", "missing.ckpt"],  # the module's setup, after the logger wrote its files
    ],
    ids=["data", "trainer", "setup"],
)
def test_a_start_that_fails_leaves_no_version_directory(corpus_path, tmp_path, monkeypatch, args):
    from picogpt_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, corpus_path, max_steps=2, limit_val_batches=0)
    with pytest.raises((SystemExit, Exception)):
        main(["fit", "--config", str(config), *args])
    assert not (tmp_path / "runs").exists()  # the version directory, and the ones made for it


def test_runs_started_at_once_get_their_own_version_directories(corpus_path, tmp_path):
    config = write_config(tmp_path, corpus_path, max_steps=2, limit_val_batches=0)
    runs = [subprocess.Popen(fit_command(config), cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    versions = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert versions == ["version_0", "version_1"]
    for version in versions:  # each holds one run: its config, its events, its checkpoint
        directory = tmp_path / "runs" / "tiny" / version
        assert (directory / "config.yaml").exists() and len(list(directory.glob("events.out.tfevents.*"))) == 1
        assert (directory / "checkpoints" / "last.ckpt").exists()


# ---- loading: planted pickles, architecture and tokenizer mismatches -------------------------------


def test_planted_pickle_is_refused_and_nothing_runs(tmp_path):
    planted, marker = tmp_path / "planted.ckpt", tmp_path / "ran"
    torch.save({"state_dict": PicoGPT(tiny_config()).state_dict(), "payload": Planted(str(marker))}, planted)
    for load in (checkpoints.load, PicoGPT.from_checkpoint):
        with pytest.raises(ValueError, match="trust") as error:
            load(str(planted))
        assert "\n" not in str(error.value) and "planted.ckpt" in str(error.value)
    assert not marker.exists()


ARCHITECTURE_CHANGES = dict(
    n_layer=3, n_embd=64, n_head=8, n_query_groups=4, block_size=64, vocab_size=70, rope_theta=500.0,
    mlp="gelu", tie_weights=False, intermediate_size=100, norm_eps=1e-6, bias=True,
)


@pytest.mark.parametrize("field, value", ARCHITECTURE_CHANGES.items())
def test_each_architecture_field_mismatch_is_named(tmp_path, field, value):
    path = tmp_path / "model.pt"
    PicoGPT(tiny_config()).save(str(path))
    stored = getattr(tiny_config(), field)
    for load in (lambda: PicoGPT.from_checkpoint(str(path), config=tiny_config(**{field: value})),
                 lambda: LanguageModelModule(tiny_config(**{field: value}), init_from=str(path)).setup("fit")):
        with pytest.raises(ValueError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and f"{field} {stored!r} (checkpoint) vs {value!r} (requested)" in message


def test_init_from_refuses_a_checkpoint_of_another_tokenizer(corpus_path, tmp_path):
    from picogpt_lightning.tokenizer import build_tokenizer

    text = corpus_path.read_text(encoding="utf-8")
    other = build_tokenizer("char", text=text.replace("Z", "#"))  # as many characters, one of them another
    assert other.vocab_size == 65
    path = tmp_path / "other.pt"
    checkpoints.save(path, PicoGPT(tiny_config()), tokenizer=other)
    model = LanguageModelModule(tiny_config(), init_from=str(path))
    data = TinyShakespeareDataModule(data_path=str(corpus_path), block_size=BLOCK_SIZE, batch_size=4, train_samples=8)
    with pytest.raises(ValueError, match="another tokenizer"):
        quiet_trainer(max_steps=1).fit(model, datamodule=data)
