"""Distillation end to end: train a teacher, distil a student from it, train the same student alone.

    python -m picogpt_lightning pipeline               # CPU-sized: minutes on a laptop
    python -m picogpt_lightning pipeline --size full   # configs/teacher, distill, student.yaml as written

Each stage is the ordinary `fit` command on its recipe, so the pipeline runs nothing a user
could not run by hand. Afterwards the three final checkpoints are scored by one function on
the same validation windows, and the distilled student writes a sample.
"""

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from picogpt_lightning import checkpoints
from picogpt_lightning.data.collate import IGNORE_INDEX
from picogpt_lightning.data.tokenizer import Tokenizer
from picogpt_lightning.model import PicoGPT
from picogpt_lightning.modules.base import next_token_loss

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("teacher", "distill", "student")

# The CPU size keeps the recipes' shapes and shrinks them: the teacher is nanoGPT's CPU
# shakespeare_char model (4 layers, width 128, block 64, batch 12), the student keeps its
# quarter of the teacher's parameters (half the depth, 3/4 of the width, 2 key/value groups).
CPU_DATA = {"block_size": 64, "batch_size": 12, "val_samples": 1200}
CPU_MODELS = {
    "teacher": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "student": {"n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 96},
}
CPU_STEPS = {"teacher": 2000, "student": 1000}


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
    """Runs the three stages, prints the table of val losses and a sample; returns both."""
    from picogpt_lightning.training import run_lightning

    if size not in ("cpu", "full"):
        raise ValueError(f"size must be 'cpu' or 'full', got {size!r}")
    for stage in STAGES:
        if not (CONFIGS / f"{stage}.yaml").is_file():
            raise FileNotFoundError(f"{CONFIGS / stage}.yaml not found; run the pipeline from a checkout of the repo")
    out = Path(out_dir)
    teacher_checkpoint = str(out / "teacher" / "last.ckpt")
    steps = {
        "teacher": teacher_steps or (CPU_STEPS["teacher"] if size == "cpu" else None),
        "student": student_steps or (CPU_STEPS["student"] if size == "cpu" else None),
    }

    for stage in STAGES:
        role = "teacher" if stage == "teacher" else "student"
        args = ["fit", "--config", str(CONFIGS / f"{stage}.yaml")]
        args += stage_flags(stage, out, progress_bar)
        if size == "cpu":
            args += cpu_flags(role)
        if steps[role] is not None:
            args += step_flags(steps[role], batch_size=CPU_DATA["batch_size"] if size == "cpu" else None)
        if stage != "teacher":  # both students read the teacher's tokenizer: the very same token ids
            args += ["--data.init_args.tokenizer", teacher_checkpoint]
        if stage == "distill":
            args += ["--model.init_args.teacher", teacher_checkpoint]
        shutil.rmtree(out / stage, ignore_errors=True)  # a leftover last.ckpt would make Lightning write last-v1.ckpt
        length = f"{steps[role]} steps" if steps[role] else "the recipe's steps"
        print(f"\n==> {STAGE_TITLES[stage]}: configs/{stage}.yaml, {length}; checkpoint {out / stage / 'last.ckpt'}, "
              f"TensorBoard logs in {out / 'runs' / stage}", flush=True)
        with lightning_reports_only_warnings():
            run_lightning(args)

    results = [evaluate(stage, out / stage / "last.ckpt") for stage in STAGES]
    text = sample(out / "distill" / "last.ckpt", prompt, sample_tokens)
    print_results(results, text)
    return results, text


STAGE_TITLES = {
    "teacher": "training the teacher",
    "distill": "distilling the student from the teacher",
    "student": "training the same student alone",
}


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


def stage_flags(stage: str, out: Path, progress_bar: bool) -> List[str]:
    # the pipeline scores the final weights itself, so each fit skips validation and keeps last.ckpt
    return [
        "--checkpoint.dirpath", str(out / stage),
        "--checkpoint.monitor", "null",
        "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--trainer.logger.init_args.name", stage,
        "--trainer.enable_progress_bar", str(progress_bar).lower(),
        "--trainer.enable_model_summary", "false",
    ]


def cpu_flags(role: str) -> List[str]:
    flags = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    flags += ["--model.init_args.config.dropout", "0.0"]
    flags += ["--model.init_args.config.block_size", str(CPU_DATA["block_size"])]
    for name, value in CPU_DATA.items():
        flags += [f"--data.init_args.{name}", str(value)]
    for name, value in CPU_MODELS[role].items():
        flags += [f"--model.init_args.config.{name}", str(value)]
    return flags


def step_flags(steps: int, batch_size: Optional[int]) -> List[str]:
    flags = ["--trainer.max_steps", str(steps), "--model.init_args.lr_decay_steps", str(steps)]
    if steps < 10:  # Lightning warns when a run is shorter than its logging interval
        flags += ["--trainer.log_every_n_steps", "1"]
    if batch_size is not None:  # one fresh window per sample, as many as the run consumes
        flags += ["--data.init_args.train_samples", str(steps * batch_size)]
    return flags


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
    checkpoint = checkpoints.load(str(checkpoint_path))
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    torch.manual_seed(1337)
    ids = torch.tensor([tokenizer.encode(prompt)])
    target_length = ids.shape[1] + max_new_tokens
    block_size = model.config.block_size
    while ids.shape[1] < target_length:
        # the model sees at most block_size tokens: continue from the last half block, half a block at a time
        new = min(target_length - ids.shape[1], block_size // 2)
        context = ids[:, -(block_size - new):]
        out = model.generate(context, max_new_tokens=new, do_sample=True, temperature=0.8, top_k=20)
        ids = torch.cat([ids, out[:, context.shape[1]:]], dim=1)
    return tokenizer.decode(ids[0])


def print_results(results: List[StageResult], text: str) -> None:
    print("\n" + results_table(results))
    print(f"\nsample from the distilled student:\n\n{text}\n")


def results_table(results: List[StageResult]) -> str:
    labels: Dict[str, str] = {"teacher": "teacher", "distill": "student + KD", "student": "student alone"}
    rows = ["| model | parameters | steps | val loss |", "|---|---|---|---|"]
    rows += [f"| {labels[r.name]} | {r.parameters / 1e6:.2f}M | {r.steps} | {r.val_loss:.4f} |" for r in results]
    return "\n".join(rows)
