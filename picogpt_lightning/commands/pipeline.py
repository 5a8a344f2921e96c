"""Distillation end to end: train a teacher, distil a student from it, train the same student alone.

    python -m picogpt_lightning pipeline               # CPU-sized: minutes on a laptop
    python -m picogpt_lightning pipeline --size full   # configs/teacher, distill, student.yaml as written

Each stage is the ordinary `fit` command on its recipe: the recipe's YAML read as data, the
pipeline's changes laid over it, the result handed to LightningCLI, so the pipeline runs
nothing a user could not run by hand. Afterwards the three final checkpoints are scored by
one function on the same validation windows, and the distilled student writes a sample.
"""

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.generation import generate_texts
from picogpt_lightning.losses import IGNORE_INDEX, next_token_loss
from picogpt_lightning.tokenizer import Tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = ("teacher", "distill", "student")
STAGE_TITLES = {
    "teacher": "training the teacher",
    "distill": "distilling the student from the teacher",
    "student": "training the same student alone",
}

# The CPU size keeps the recipes' shapes and shrinks them: the teacher is nanoGPT's CPU
# shakespeare_char model (4 layers, width 128, block 64, batch 12), the student keeps its
# quarter of the teacher's parameters (half the depth, 3/4 of the width, 2 key/value groups).
CPU_DATA = {"block_size": 64, "batch_size": 12, "val_samples": 1200}
CPU_MODELS = {
    "teacher": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "student": {"n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 96},
}
CPU_STEPS = {"teacher": 2000, "student": 1000}
CPU_VAL_EVERY = 250  # steps between a stage's validations at cpu size: val/loss in each TensorBoard run


@dataclass
class StageResult:
    name: str
    parameters: int
    steps: int
    val_loss: float


def run_pipeline(
    size: str = "cpu",
    out_dir: str = "runs/pipeline",
    teacher_steps: Optional[int] = None,
    student_steps: Optional[int] = None,
    prompt: str = "ROMEO:",
    sample_tokens: int = 200,
    progress_bar: bool = True,
) -> Tuple[List[StageResult], str]:
    """Train a teacher, distil a student, train the same student alone; print their val losses and a sample.

    Args:
        size: "cpu" shrinks configs/teacher, distill and student.yaml to run in minutes on a CPU; "full" runs them as written.
        out_dir: where checkpoints (out_dir/<stage>/last.ckpt, best.ckpt by val/loss) and TensorBoard runs go;
            the student is distilled from the teacher's best.ckpt.
        teacher_steps: training steps of the teacher (default: 2000 at cpu size, the recipe's at full size).
        student_steps: training steps of each student, the same for both (default: 1000 at cpu size).
        prompt: the start of the distilled student's sample.
        sample_tokens: how many tokens to sample.
        progress_bar: show Lightning's progress bars.
    """
    # Lightning loads only once a stage runs, so `python -m picogpt_lightning --help` starts without it
    from picogpt_lightning.stop_signals import exits_on_signals
    from picogpt_lightning.lightning_cli import run_lightning

    if size not in ("cpu", "full"):
        raise UserError(f"size must be 'cpu' or 'full', got {size!r}")
    for stage in STAGES:
        if not (CONFIGS / f"{stage}.yaml").is_file():
            raise InputNotFound(f"{CONFIGS / stage}.yaml not found; run the pipeline from a checkout of the repo")
    out = Path(out_dir)
    steps = {
        "teacher": teacher_steps or (CPU_STEPS["teacher"] if size == "cpu" else None),
        "student": student_steps or (CPU_STEPS["student"] if size == "cpu" else None),
    }
    # a signal between stages, or while scoring, exits 128 + the signal too (a stage's run saves first)
    with exits_on_signals():
        for stage in STAGES:
            role = "teacher" if stage == "teacher" else "student"
            config = stage_config(stage, out, size, steps[role], progress_bar)
            shutil.rmtree(out / stage, ignore_errors=True)  # a leftover last.ckpt would make Lightning write last-v1.ckpt
            length = f"{steps[role]} steps" if steps[role] else "the recipe's steps"
            print(f"\n==> {STAGE_TITLES[stage]}: configs/{stage}.yaml, {length}; checkpoint {out / stage / 'last.ckpt'}, "
                  f"TensorBoard logs in {out / 'runs' / stage}", flush=True)
            with lightning_reports_only_warnings():
                run_lightning({"fit": config})

        # the teacher as it taught, the students' final weights on equal terms
        results = [evaluate(stage, scored_checkpoint(out, stage)) for stage in STAGES]
        text = sample(out / "distill" / "last.ckpt", prompt, sample_tokens)
    print_results(results, text)
    return results, text


# ---- each stage's run: its recipe as data, with the pipeline's changes laid over it ------------


def scored_checkpoint(out: Path, stage: str) -> Path:
    """The teacher's best.ckpt (what the student learns from), each student's last.ckpt."""
    return out / stage / ("best.ckpt" if stage == "teacher" else "last.ckpt")


def stage_config(stage: str, out: Path, size: str, steps: Optional[int], progress_bar: bool) -> Dict[str, Any]:
    """configs/<stage>.yaml as LightningCLI's `fit` config, changed for the pipeline."""
    role = "teacher" if stage == "teacher" else "student"
    config = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text(encoding="utf-8"))
    changes = [stage_overrides(stage, out, progress_bar)]
    if size == "cpu":
        changes.append(cpu_overrides(role))
    if steps is not None:
        changes.append(step_overrides(steps, batch_size=CPU_DATA["batch_size"] if size == "cpu" else None))
    teacher_checkpoint = str(scored_checkpoint(out, "teacher"))
    if stage != "teacher":  # both students read the teacher's tokenizer: the very same token ids
        changes.append({"data": {"init_args": {"tokenizer": teacher_checkpoint}}})
    if stage == "distill":
        changes.append({"model": {"init_args": {"teacher": teacher_checkpoint}}})
    for change in changes:
        merge_into(config, change)
    validate_every(config["trainer"], CPU_VAL_EVERY if size == "cpu" else None)
    return config


def validate_every(trainer: Dict[str, Any], interval: Optional[int]) -> None:
    """Sets the stage's validation interval (None: the recipe's), never past its last step, so every
    stage's TensorBoard run has val/loss."""
    interval = interval or trainer.get("val_check_interval") or CPU_VAL_EVERY
    trainer["val_check_interval"] = min(interval, trainer.get("max_steps") or interval)


def merge_into(config: Dict[str, Any], change: Dict[str, Any]) -> None:
    """Lays `change` over `config` in place, key by key down nested dicts."""
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge_into(config[key], value)
        else:
            config[key] = value


def stage_overrides(stage: str, out: Path, progress_bar: bool) -> Dict[str, Any]:
    # each fit validates (val/loss in TensorBoard, best.ckpt by it); the pipeline scores the models itself after
    return {
        "checkpoint": {"dirpath": str(out / stage)},
        "trainer": {
            "num_sanity_val_steps": 0,
            "logger": {"init_args": {"save_dir": str(out / "runs"), "name": stage}},
            "enable_progress_bar": progress_bar,
            "enable_model_summary": False,
        },
    }


def cpu_overrides(role: str) -> Dict[str, Any]:
    return {
        "trainer": {"accelerator": "cpu", "precision": "32-true"},
        "model": {"init_args": {"config": {"dropout": 0.0, "block_size": CPU_DATA["block_size"], **CPU_MODELS[role]}}},
        "data": {"init_args": dict(CPU_DATA)},
    }


def step_overrides(steps: int, batch_size: Optional[int]) -> Dict[str, Any]:
    change: Dict[str, Any] = {"trainer": {"max_steps": steps}, "model": {"init_args": {"lr_decay_steps": steps}}}
    if steps < 10:  # Lightning warns when a run is shorter than its logging interval
        change["trainer"]["log_every_n_steps"] = 1
    if batch_size is not None:  # one fresh window per sample, as many as the run consumes
        change["data"] = {"init_args": {"train_samples": steps * batch_size}}
    return change


def stage_flags(stage: str, out: Path, progress_bar: bool) -> List[str]:
    """`stage_overrides` as command-line flags, for a script that prints the command it runs."""
    return as_flags(stage_overrides(stage, out, progress_bar))


def as_flags(change: Dict[str, Any], prefix: str = "") -> List[str]:
    flags: List[str] = []
    for key, value in change.items():
        if isinstance(value, dict):
            flags += as_flags(value, f"{prefix}{key}.")
        else:
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            flags += [f"--{prefix}{key}", text]
    return flags


@contextmanager
def lightning_reports_only_warnings():
    """The pipeline prints one line per stage itself: Lightning's start-up notes (devices, tips, model
    summary) would bury them, so only its warnings and the progress bar show while a stage runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---- scoring the three models the same way --------------------------------------------


def evaluate(name: str, checkpoint_path: Path) -> StageResult:
    """Mean next-token cross-entropy of the final weights over the validation windows the run used."""
    from picogpt_lightning.data import TinyShakespeareDataModule

    checkpoint = checkpoints.load(str(checkpoint_path))
    datamodule = TinyShakespeareDataModule(**checkpoint.datamodule_hparams)
    model = PicoGPT.from_checkpoint(checkpoint)
    return StageResult(name, model.num_parameters(), checkpoint.global_step, val_loss(model, datamodule))


def val_loss(model: PicoGPT, datamodule) -> float:
    """Mean next-token cross-entropy per real token of `model` over the datamodule's validation set."""
    datamodule.setup("validate")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            batch_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            total += next_token_loss(logits, batch["labels"]).item() * batch_tokens
            tokens += batch_tokens
    return total / tokens


def sample(checkpoint_path: Path, prompt: str, max_new_tokens: int) -> str:
    """The model's sampled continuation of `prompt` (temperature 0.8, the 20 likeliest tokens), seeded;
    past block_size generation slides its window, as the `generate` command does."""
    checkpoint = checkpoints.load(str(checkpoint_path))
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    torch.manual_seed(1337)
    options = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=20)
    return generate_texts(model, tokenizer, [prompt], **options)[0]


def print_results(results: List[StageResult], text: str) -> None:
    print("\n" + results_table(results))
    print(f"\nsample from the distilled student:\n\n{text}\n")


def results_table(results: List[StageResult]) -> str:
    labels: Dict[str, str] = {"teacher": "teacher", "distill": "student + KD", "student": "student alone"}
    rows = ["| model | parameters | steps | val loss |", "|---|---|---|---|"]
    rows += [f"| {labels[r.name]} | {r.parameters / 1e6:.2f}M | {r.steps} | {r.val_loss:.4f} |" for r in results]
    return "\n".join(rows)
