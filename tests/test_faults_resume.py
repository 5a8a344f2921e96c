"""A resume is exact or refused: each mismatch in one line, the progress bar's totals, where a resumed run writes.

The runs go through `cli.main` in this process: the command line as `python -m picogpt_lightning
fit` runs it, without an interpreter's start-up for each. A refusal is the SystemExit whose message
cli.main prints as the process's one stderr line, exiting 1 (tests/test_reliability.py runs that
path in real subprocesses).
"""

import os
from pathlib import Path

import pytest
import yaml

from picogpt_lightning import checkpoints
from picogpt_lightning.callbacks import LastCheckpoint, StepProgressBar
from picogpt_lightning.cli import main
from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.modules import LanguageModelModule
from tiny_training import BLOCK_SIZE, quiet_trainer, seed_everything, tiny_config, tiny_teacher

LANGUAGE_MODEL = "picogpt_lightning.modules.LanguageModelModule"

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*val_dataloader")


def write_config(directory: Path, model_class: str = LANGUAGE_MODEL, name: str = "tiny", **model_args) -> Path:
    """A tiny fit (the corpus from PICOGPT_DATA, so a test can swap it) logging under directory/runs/<name>."""
    config = {
        "model": {"class_path": model_class, "init_args": {
            "config": {"block_size": BLOCK_SIZE, "n_layer": 1, "n_head": 2, "n_query_groups": 1, "n_embd": 16, "dropout": 0.1},
            "warmup_steps": 2, **model_args}},
        "data": {"class_path": "picogpt_lightning.data.TinyShakespeareDataModule", "init_args": {
            "block_size": BLOCK_SIZE, "batch_size": 4, "train_samples": 16, "val_samples": 4}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(directory / "runs"), "name": name}}},
    }
    path = directory / f"{name}-{model_class.rpartition('.')[2]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *args: str) -> None:
    main(["fit", "--config", str(config), *args])


def refusal(config: Path, *args: str) -> str:
    """The one line `fit` stops with (cli.main exits with it: status 1, the line on stderr)."""
    with pytest.raises(SystemExit) as stopped:
        fit(config, *args)
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_path) -> Path:
    """The first 60,000 characters of tiny_shakespeare: these runs need a few batches, not a corpus to encode."""
    whole = corpus_path
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(whole.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A checkpoint of two steps, from the tiny config, and that config."""
    directory = tmp_path_factory.mktemp("trained")
    config = write_config(directory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PICOGPT_DATA", str(corpus))
        fit(config)
    return config, directory / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(autouse=True)
def _corpus(monkeypatch, corpus):
    monkeypatch.setenv("PICOGPT_DATA", str(corpus))


MISMATCHES = {
    "width": (["--model.init_args.config.n_embd=32"], "model.config.n_embd 16 (checkpoint) vs 32 (command)"),
    "dropout": (["--model.init_args.config.dropout=0.2"], "model.config.dropout 0.1 (checkpoint) vs 0.2 (command)"),
    "weight_decay": (["--model.init_args.weight_decay=0.05"], "model.weight_decay 0.1 (checkpoint) vs 0.05 (command)"),
    "learning_rate": (["--model.init_args.learning_rate=0.002"], "model.learning_rate 0.001 (checkpoint) vs 0.002 (command)"),
    "batch_size": (["--data.init_args.batch_size=8"], "data.batch_size 4 (checkpoint) vs 8 (command)"),
    "sample_mode": (["--data.init_args.mode=speeches"], "data.mode 'blocks' (checkpoint) vs 'speeches' (command)"),
    "val_samples": (["--data.init_args.val_samples=2"], "data.val_samples 4 (checkpoint) vs 2 (command)"),
    "data_block_size": (["--data.init_args.block_size=16"], "data.block_size 32 (checkpoint) vs 16 (command)"),
}


@pytest.mark.parametrize("args, named", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_each_mismatch_is_refused_in_one_line_naming_the_field_and_both_values(trained, args, named):
    config, checkpoint = trained
    before = sorted(checkpoint.parent.parent.rglob("*"))
    message = refusal(config, *args, "--ckpt_path", str(checkpoint))
    assert message.startswith(f"error: cannot resume {checkpoint}: {named}; "), message
    assert f"--model.init_args.init_from {checkpoint}" in message  # the way to start anew from its weights
    assert sorted(checkpoint.parent.parent.rglob("*")) == before  # the refused run wrote nothing


def test_every_difference_is_named_in_the_one_line(trained):
    config, checkpoint = trained
    message = refusal(config, "--model.init_args.config.n_embd=32", "--data.init_args.batch_size=8",
                      "--model.init_args.betas=[0.9,0.99]", "--ckpt_path", str(checkpoint))
    assert (f"{checkpoint}: model.config.n_embd 16 (checkpoint) vs 32 (command), model.betas [0.9, 0.95] vs [0.9, 0.99], "
            "data.batch_size 4 vs 8; ") in message


def test_another_tokenizer_of_the_same_size_is_refused(trained, tmp_path, monkeypatch, corpus):
    config, checkpoint = trained
    text = corpus.read_text(encoding="utf-8")
    other = tmp_path / "other.txt"  # as many characters, one of them another: the same vocab_size, other ids
    other.write_text(text.replace("e", "#"), encoding="utf-8")
    monkeypatch.setenv("PICOGPT_DATA", str(other))
    message = refusal(config, "--ckpt_path", str(checkpoint))
    size = len(set(text))
    assert f"{checkpoint}: tokenizer 'char' of {size} tokens (checkpoint) vs another 'char' of {size} tokens (command); " in message


def test_another_module_type_is_refused(trained, tmp_path):
    config, checkpoint = trained
    distill = write_config(tmp_path, "picogpt_lightning.modules.DistillationModule", teacher=tiny_teacher(str(tmp_path / "t.pt")))
    message = refusal(distill, "--ckpt_path", str(checkpoint))
    # only the class: another class's arguments mean other things; a student may start from the weights (init_from)
    assert message.startswith(f"error: cannot resume {checkpoint}: model.class_path {LANGUAGE_MODEL} (checkpoint) vs "
                              "picogpt_lightning.modules.DistillationModule (command); rerun with the checkpoint's "
                              "settings or start a new run from its weights with --model.init_args.init_from ")


def test_a_checkpoint_older_than_an_argument_resumes_when_the_command_leaves_it_at_its_default(trained, tmp_path):
    import dataclasses

    import torch

    config, checkpoint = trained
    old = torch.load(checkpoint, weights_only=False)
    for name in ("lora", "optimizer", "muon_lr"):  # arguments added after such a checkpoint was written
        del old["hyper_parameters"][name]
    stored_config = old["hyper_parameters"]["config"]
    stored_config = dict(stored_config) if isinstance(stored_config, dict) else dataclasses.asdict(stored_config)
    old["hyper_parameters"]["config"] = {k: v for k, v in stored_config.items() if k != "sub_norm"}
    older = tmp_path / "older.ckpt"
    torch.save(old, older)
    fit(config, "--trainer.max_steps=3", "--ckpt_path", str(older))  # resumes
    message = refusal(config, "--trainer.max_steps=3", "--model.init_args.optimizer=muon", "--ckpt_path", str(older))
    assert "model.optimizer unset (checkpoint) vs 'muon' (command)" in message


# ---- where a resumed run writes, and `--ckpt_path last` ----------------------------------------------


def test_a_resumed_run_writes_into_its_checkpoints_version_directory(tmp_path, recwarn):
    config = write_config(tmp_path)
    fit(config)
    version = tmp_path / "runs" / "tiny" / "version_0"
    fit(config, "--trainer.max_steps=4", "--ckpt_path", str(version / "checkpoints" / "last.ckpt"))
    assert [path.name for path in (tmp_path / "runs" / "tiny").iterdir()] == ["version_0"]  # no version_1
    assert checkpoints.load(version / "checkpoints" / "last.ckpt").global_step == 4
    assert len(list(version.glob("events.out.tfevents.*"))) == 2  # the resumed run's logs beside the first's
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]


def test_ckpt_path_last_resumes_the_newest_last_checkpoint_of_the_runs_name(tmp_path):
    config = write_config(tmp_path)
    fit(config)
    fit(config)
    run = tmp_path / "runs" / "tiny"
    newest = run / "version_0" / "checkpoints" / "last.ckpt"
    later = os.stat(run / "version_1" / "checkpoints" / "last.ckpt").st_mtime + 60
    os.utime(newest, (later, later))  # the newest by time written, though not the highest version
    fit(config, "--trainer.max_steps=3", "--ckpt_path", "last")
    assert checkpoints.load(newest).global_step == 3
    assert checkpoints.load(run / "version_1" / "checkpoints" / "last.ckpt").global_step == 2
    assert sorted(path.name for path in run.iterdir()) == ["version_0", "version_1"]

    fresh = write_config(tmp_path, name="fresh")
    message = refusal(fresh, "--ckpt_path", "last")
    assert f"--ckpt_path last: no {tmp_path / 'runs' / 'fresh'}/version_*/checkpoints/last.ckpt" in message
    assert not (tmp_path / "runs" / "fresh").exists()


# ---- the progress bar ----------------------------------------------------------------------------------


class RecordingBar(StepProgressBar):
    """The training bar's (completed, total) after each batch."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, trainer, *args) -> None:
        super().on_train_batch_end(trainer, *args)
        self.seen.append((self.train_progress_bar.completed, self.train_progress_bar.total))


def bar_of_run(corpus: Path, root: Path, max_steps: int, ckpt_path=None):
    seed_everything()
    model = LanguageModelModule(tiny_config(), warmup_steps=2)
    # 12 windows of 4: three batches an epoch, so both runs cross epochs
    data = TinyShakespeareDataModule(data_path=str(corpus), block_size=BLOCK_SIZE, batch_size=4, train_samples=12, seed=7)
    bar = RecordingBar()
    trainer = quiet_trainer(max_steps=max_steps, enable_progress_bar=True, enable_checkpointing=True, default_root_dir=root,
                            callbacks=[bar, LastCheckpoint(dirpath=str(root))])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return bar.seen


def test_the_progress_bar_counts_the_runs_steps_of_max_steps_also_when_resumed(corpus, tmp_path):
    assert bar_of_run(corpus, tmp_path, 4) == [(step, 4) for step in range(1, 5)]
    resumed = bar_of_run(corpus, tmp_path, 8, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed == [(step, 8) for step in range(5, 9)]
