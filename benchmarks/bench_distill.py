"""The distillation pipeline end to end: teacher, student + KD and student alone, scored alike.

    python -m benchmarks.bench_distill                  # CPU size without a GPU, full size with one
    python -m benchmarks.bench_distill --size cpu

Runs `picogpt_lightning.commands.pipeline.run_pipeline` (the `pipeline` command, what `make demo`
runs) in a temporary directory and writes the val losses, the gain from distillation and
the wall time into BENCHMARKS.md.
"""

import argparse
import inspect
import math
import tempfile
import time

import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.modules import DistillationModule
from picogpt_lightning.commands.pipeline import run_pipeline

LABELS = {"teacher": "teacher", "distill": "student + KD", "student": "student alone"}


def defaults() -> str:
    signature = inspect.signature(DistillationModule.__init__).parameters
    names = ("temperature", "alpha_ce", "alpha_kd", "alpha_cos")
    return ", ".join(f"{name} = {signature[name].default}" for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("cpu", "full"), default="full" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher_steps", type=int, default=None)
    parser.add_argument("--student_steps", type=int, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results, text = run_pipeline(
            args.size, out, args.teacher_steps, args.student_steps, sample_tokens=300, progress_bar=False
        )
    wall = time.perf_counter() - start

    teacher, distilled, alone = results
    gain = alone.val_loss - distilled.val_loss
    rows = [
        [LABELS[r.name], f"{r.parameters / 1e6:.2f}M", r.steps, f"{r.val_loss:.4f}", f"{math.exp(r.val_loss):.3f}"]
        for r in results
    ]
    size = (
        "CPU size: teacher 4 layers x 128 (nanoGPT's CPU shakespeare_char model), students 2 layers x 96 "
        "with 2 key/value groups, block 64, batch 12, dropout 0"
        if args.size == "cpu"
        else "full size: configs/teacher.yaml, configs/distill.yaml and configs/student.yaml as written"
    )
    verdict = "beats" if gain > 0 else "does NOT beat"
    body = (
        f"`python -m benchmarks.bench_distill --size {args.size}` on {machine_description()}.\n\n"
        f"{size}. Both students start from the same weights (same seed) and see the same batches for "
        f"the same steps; the student + KD run uses DistillationModule's defaults ({defaults()}). "
        f"Val loss is next-token cross-entropy of the final weights on the same validation "
        f"windows for all three.\n\n"
        + markdown_table(["model", "parameters", "steps", "val loss", "val ppl"], rows)
        + f"\n\nThe distilled student **{verdict}** the student alone by {gain:.4f} nats/token "
        f"({100 * gain / alone.val_loss:.1f}% of its loss); the teacher is "
        f"{alone.val_loss - teacher.val_loss:.4f} below the student alone. "
        f"Whole pipeline (three fits, scoring, sample): {wall / 60:.1f} min.\n\n"
        f"Sample from the distilled student (T = 0.8, top-k 20, seed 1337):\n\n```\n{text}\n```"
    )
    write_section("distill", "Distillation: teacher, student + KD, student alone", body)


if __name__ == "__main__":
    main()
