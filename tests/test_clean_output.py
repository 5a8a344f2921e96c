"""What fit, SFT, DPO and export print holds no line a user cannot act on, and DPO's bar stays short."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"

# each printed by Lightning, datasets or transformers before this project hid it
UNACTIONABLE = (
    "litlogger",
    "callbacks returned in configure_callbacks will override",
    "Total FLOPs",
    "Map:",
    "Writing model shards",
)


def run(corpus_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "picogpt_lightning", *args], capture_output=True, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PICOGPT_DATA": str(corpus_path), "OMP_NUM_THREADS": "1", "COLUMNS": "80"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def assert_clean(output: str) -> None:
    found = [line for line in UNACTIONABLE if line in output]
    assert not found, f"{found} in:\n{output}"


def trainer_flags(tmp_path: Path, name: str) -> list:
    # the progress bar and the model summary stay on: they are what the user reads
    return ["--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.logger.init_args.name", name]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_path):
    tmp_path = tmp_path_factory.mktemp("clean")
    output = run(corpus_path, "fit", "--config", str(CONFIGS / "pretrain_cpu.yaml"),
                 "--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32",
                 "--model.init_args.config.n_head", "2", "--data.init_args.batch_size", "4",
                 "--data.init_args.val_samples", "16", "--trainer.max_steps", "4",
                 "--trainer.val_check_interval", "2", *trainer_flags(tmp_path, "fit"))
    return corpus_path, tmp_path, output, tmp_path / "runs" / "fit" / "version_0" / "checkpoints" / "last.ckpt"


def test_fit_prints_the_summary_and_bar_without_unactionable_lines(pretrained):
    _, _, output, checkpoint = pretrained
    assert checkpoint.is_file()
    assert "Trainable params" in output and "val/loss" in output  # the summary and the bar are still there
    assert_clean(output)


def test_sft_output_is_clean(pretrained):
    corpus, tmp_path, _, checkpoint = pretrained
    output = run(corpus, "fit", "--config", str(CONFIGS / "sft.yaml"), "--model.init_args.init_from", str(checkpoint),
                 "--data.init_args.corpus_path", str(corpus), "--data.init_args.batch_size", "8",
                 "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                 *trainer_flags(tmp_path, "sft"))
    assert "val/loss" in output
    assert_clean(output)


def test_dpo_output_is_clean_and_its_bar_shows_a_few_short_metrics(pretrained):
    corpus, tmp_path, _, checkpoint = pretrained
    output = run(corpus, "fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.init_args.init_from", str(checkpoint),
                 "--data.init_args.corpus_path", str(corpus), "--data.init_args.prompt_chars", "16",
                 "--data.init_args.completion_chars", "8", "--data.init_args.prompts_per_speech", "2",
                 "--data.init_args.batch_size", "8", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--trainer.limit_val_batches", "1", *trainer_flags(tmp_path, "dpo"))
    assert_clean(output)
    first, *rest = output[output.index("Epoch 0"):].splitlines()
    bar = "\n".join([first, *itertools.takewhile(lambda line: line.startswith(" "), rest)])  # the metrics wrap indented
    assert "val/acc" in bar and "val/loss" in bar
    for logged_elsewhere in ("logps", "margins", "rewards/chosen", "rewards/rejected", "nll", "…"):
        assert logged_elsewhere not in bar, bar  # in TensorBoard, not on the bar
    assert len(bar.strip().splitlines()) <= 4, bar


def test_export_output_is_one_line_of_its_own(pretrained):
    corpus, tmp_path, _, checkpoint = pretrained
    output = run(corpus, "export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()
    assert f"wrote {tmp_path / 'hf'}" in output
    assert_clean(output)
