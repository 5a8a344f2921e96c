"""configs/pretrain.yaml on a GPU: Lightning vs a plain compiled loop, then time to val/loss <= 1.48,
tokens/s and MFU per precision.

    python -m benchmarks.bench_gpu                      # throughput paths, then fp32, bf16-mixed,
                                                        # bf16-mixed + compile, FSDP
    python -m benchmarks.bench_gpu --variants bf16-mixed
    python -m benchmarks.bench_gpu --smoke              # a tiny model for a few steps, CPU is fine

A full run first runs benchmarks.bench_throughput (Trainer.fit eager and compiled against a plain
compiled loop of the same model and batch: tokens/s, ms/step, MFU; its "throughput_gpu" section).
Each variant is one `fit` through the CLI with the recipe's settings and a few overrides.
Tokens/s and MFU are the medians of what Lightning's ThroughputMonitor logged (the recipe
adds it); time to target is read from the wall-clock stamps of the val/loss events. The FSDP
variant (configs/fsdp.yaml, FSDP2, on one device) is a smoke run: it shows the sharded path trains
and checkpoints, not a speed-up. A full run writes the "pretrain_gpu" section of BENCHMARKS.md;
--smoke only prints.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks import bench_throughput
from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT
from picogpt_lightning.cli import main as cli_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TARGET = 1.48  # nanoGPT reaches 1.469 with this setting
FSDP_SMOKE_STEPS = 100

VARIANTS = {
    "fp32": ["--trainer.precision", "32-true"],
    "bf16-mixed": [],  # the recipe as written
    "bf16-mixed + compile": ["--model.init_args.compile", "true"],
    "FSDP, 1 device, bf16-mixed": [
        "--config", str(CONFIGS / "fsdp.yaml"),
        "--trainer.max_steps", str(FSDP_SMOKE_STEPS), "--trainer.val_check_interval", str(FSDP_SMOKE_STEPS),
    ],
}  # fmt: skip
SMOKE = [  # a model and data small enough for a CPU, so the script's own path can be checked anywhere
    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
    "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4",
    "--data.init_args.train_samples", "64", "--data.init_args.val_samples", "8",
    "--model.init_args.config.block_size", "32", "--model.init_args.config.n_layer", "1",
    "--model.init_args.config.n_embd", "32", "--model.init_args.config.n_head", "2",
]  # fmt: skip


def scalars(events: EventAccumulator, tag: str):
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


def run_variant(name: str, overrides: list, smoke: bool, out: Path) -> dict:
    log_root = out / name.replace(" ", "_").replace(",", "").replace("+", "plus")
    args = ["fit", "--config", str(CONFIGS / "pretrain.yaml"), "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger.init_args.save_dir", str(log_root)] + overrides
    if smoke:
        args += SMOKE
    start = time.time()
    cli_main(args)
    wall = time.time() - start

    log_dir = next(log_root.glob("pretrain/version_*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    val = scalars(events, "val/loss")
    reached = [event for event in val if event.value <= TARGET]
    time_to_target = f"{reached[0].wall_time - start:.0f} s (step {reached[0].step})" if reached else "not reached"
    tokens_per_s = [event.value for event in scalars(events, "train/device/items_per_sec")]
    mfu = [event.value for event in scalars(events, "train/device/mfu")]
    PicoGPT.from_checkpoint(str(log_dir / "checkpoints" / "last.ckpt"))  # the checkpoint must load
    return {
        "variant": name,
        "final val/loss": f"{val[-1].value:.4f}" if val else "-",
        f"time to val/loss <= {TARGET}": time_to_target,
        "wall time": f"{wall:.0f} s",
        "tokens/s": f"{statistics.median(tokens_per_s):,.0f}" if tokens_per_s else "-",
        "MFU": f"{100 * statistics.median(mfu):.1f}%" if mfu else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 steps; prints, writes nothing")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    variants = args.variants
    if not gpu and not args.smoke:
        raise SystemExit("error: no GPU found; this benchmark is for a GPU (use --smoke to check it on a CPU)")
    if not args.smoke:
        bench_throughput.main([])
    with tempfile.TemporaryDirectory() as out:
        rows = [run_variant(name, VARIANTS[name], args.smoke, Path(out)) for name in variants]
    table = markdown_table(list(rows[0]), [list(row.values()) for row in rows])
    if args.smoke:
        print(table)
        return
    body = (
        f"{machine_description()}. `python -m benchmarks.bench_gpu`: configs/pretrain.yaml (nanoGPT's "
        f"shakespeare_char GPU setting, 6 layers, width 384, block 256, batch 64, 5000 steps, val every 250 "
        f"steps over 200 batches), one device; the FSDP row is a {FSDP_SMOKE_STEPS}-step smoke run of "
        "configs/fsdp.yaml. tokens/s and MFU: medians of Lightning's ThroughputMonitor (6N + 12 L d T FLOPs "
        "per token, `flops_per_token` in modules/base.py; dense bf16 peaks from callbacks.py).\n\n" + table
    )
    write_section("pretrain_gpu", "Pretraining on one GPU (configs/pretrain.yaml)", body)


if __name__ == "__main__":
    main()
