"""configs/pretrain_cpu.yaml end to end through the CLI: final val/loss and wall time.

    python -m benchmarks.bench_pretrain_cpu [--max_steps 2000]   (from the repository root)

nanoGPT reports val 1.88 for this setting on CPU; the target here is val/loss <= 1.90.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT
from picogpt_lightning.cli import main as cli_main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain_cpu.yaml"


def scalar_series(log_dir: Path, tag: str):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max_steps", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        cli_main(
            [
                "fit",
                "--config", str(CONFIG),
                "--trainer.max_steps", str(args.max_steps),
                "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.save_dir", out,
            ]
        )
        wall = time.perf_counter() - start
        log_dir = next(Path(out).glob("pretrain_cpu/version_*"))
        val = scalar_series(log_dir, "val/loss")
        ppl = scalar_series(log_dir, "val/ppl")
        n_params = PicoGPT.from_checkpoint(str(log_dir / "checkpoints" / "last.ckpt")).num_parameters()

    rows = [[step, f"{loss:.4f}", f"{p:.3f}"] for (step, loss), (_, p) in zip(val, ppl)]
    final = val[-1][1]
    body = (
        f"`python -m benchmarks.bench_pretrain_cpu` on {machine_description()}.\n\n"
        f"configs/pretrain_cpu.yaml (nanoGPT's shakespeare_char CPU setting, char level, 4 layers, "
        f"width 128, block 64, batch 12, {args.max_steps} steps, {n_params / 1e6:.2f}M parameters): "
        f"**final val/loss {final:.4f}** (target <= 1.90; nanoGPT reports 1.88), "
        f"wall time {wall:.0f} s for the whole `fit` (validation included).\n\n"
        + markdown_table(["step", "val/loss", "val/ppl"], rows)
    )
    write_section("pretrain_cpu", "Pretraining on CPU (configs/pretrain_cpu.yaml)", body)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
