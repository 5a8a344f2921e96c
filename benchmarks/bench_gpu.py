"""configs/pretrain.yaml on one GPU: Lightning against a plain compiled loop, a dropout and schedule
sweep, and the recipe alone: time to val/loss <= 1.48, best val/loss, tokens/s, MFU.

    python -m benchmarks.bench_gpu                 # the three stages below; writes BENCHMARKS.md
    python -m benchmarks.bench_gpu --stages 1 3    # throughput and the recipe only
    python -m benchmarks.bench_gpu --smoke         # a tiny model for a few steps (a CPU is fine); prints only

1. benchmarks.bench_throughput: Trainer.fit eager and compiled against a plain compiled loop of
   the same model and batch (its "throughput_gpu" section).
2. Dropout and learning-rate schedule settings of the recipe, each a full 5,000-step `fit` through
   the CLI with `compile: true`, all at once on the one GPU (they share it, so their wall times are
   not one run's), beside a short FSDP2 run of configs/fsdp.yaml that shows the sharded path trains
   and writes a checkpoint PicoGPT.from_checkpoint reads ("pretrain_gpu_sweep").
3. The recipe as written, alone on the GPU, with `compile: true`: its wall-clock time to val/loss
   <= 1.48 (from process start, compilation included), best val/loss, and tokens/s and MFU, the
   medians of what its PeakFlopsThroughputMonitor logged ("pretrain_gpu").
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks import bench_throughput
from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TARGET = 1.48  # nanoGPT's model reaches 1.469 with this setting
FSDP_STEPS = 100


def setting(dropout: float, lr_decay_steps: int) -> list:
    return ["--model.init_args.config.dropout", str(dropout), "--model.init_args.lr_decay_steps", str(lr_decay_steps)]


VARIANTS = {  # dropout and schedule settings of configs/pretrain.yaml, all compiled
    "dropout 0.2, lr decay over 5000 steps (nanoGPT's)": setting(0.2, 5000),
    "dropout 0.3, lr decay over 5000 steps": setting(0.3, 5000),
    "dropout 0.2, lr decay over 2500 steps": setting(0.2, 2500),
    "dropout 0.3, lr decay over 3000 steps": setting(0.3, 3000),
}
COMPILED = ["--model.init_args.compile", "true"]
FSDP = [
    "--config", str(CONFIGS / "fsdp.yaml"),
    "--trainer.max_steps", str(FSDP_STEPS), "--trainer.val_check_interval", str(FSDP_STEPS),
]  # fmt: skip
SMOKE = [  # a model and data small enough for a CPU, so the script's own path can be checked anywhere
    "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu",
    "--trainer.precision", "32-true",
    "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4",
    "--data.init_args.train_samples", "64", "--data.init_args.val_samples", "8",
    "--model.init_args.config.block_size", "32", "--model.init_args.config.n_layer", "1",
    "--model.init_args.config.n_embd", "32", "--model.init_args.config.n_head", "2",
]  # fmt: skip
SETTING = (
    "configs/pretrain.yaml (nanoGPT's shakespeare_char GPU setting: 6 layers, width 384, block 256, batch 64, "
    "5000 steps, val every 250 steps over 200 batches) with `compile: true`. Wall times count from process "
    "start (compilation included). tokens/s and MFU: medians of PeakFlopsThroughputMonitor (6N + 12 L d T "
    "FLOPs per token, `flops_per_token` in modules/flops.py; dense bf16 peaks from callbacks/throughput.py)."
)


def start_fit(name: str, overrides: list, out: Path, smoke: bool):
    """Starts one `fit` of configs/pretrain.yaml in its own process; returns (process, log root, start time)."""
    log_root = out / "".join(c if c.isalnum() else "_" for c in name)
    args = [sys.executable, "-m", "picogpt_lightning", "fit", "--config", str(CONFIGS / "pretrain.yaml")]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(log_root)]
    args += overrides + (SMOKE if smoke else [])
    log_root.mkdir(parents=True)
    log = open(log_root / "fit.log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log_root, time.time()


def scalars(events: EventAccumulator, tag: str) -> list:
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


def summarize(name: str, process: subprocess.Popen, log_root: Path, started: float) -> dict:
    """What one finished `fit` logged: best and final val/loss, time to target, tokens/s, MFU."""
    row = {"variant": name}
    if process.returncode != 0:
        tail = (log_root / "fit.log").read_text().strip().splitlines()[-1:]
        return row | {"best val/loss (step)": f"failed ({process.returncode}): {' '.join(tail)[:120]}"}
    log_dir = next(log_root.glob("pretrain/version_*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    val = scalars(events, "val/loss")
    best = min(val, key=lambda event: event.value)
    reached = [event for event in val if event.value <= TARGET]
    tokens_per_s = [event.value for event in scalars(events, "train/device/items_per_sec")]
    mfu = [event.value for event in scalars(events, "train/device/mfu")]
    PicoGPT.from_checkpoint(str(log_dir / "checkpoints" / "last.ckpt"))  # the checkpoint must load
    return row | {
        "best val/loss (step)": f"{best.value:.4f} ({best.step})",
        "final val/loss": f"{val[-1].value:.4f}",
        f"time to val/loss <= {TARGET}": (
            f"{reached[0].wall_time - started:.0f} s (step {reached[0].step})" if reached else "not reached"
        ),
        "wall time": f"{max(event.wall_time for event in val) - started:.0f} s",
        "tokens/s": f"{statistics.median(tokens_per_s):,.0f}" if tokens_per_s else "-",
        "MFU": f"{100 * statistics.median(mfu):.1f}%" if mfu else "-",
    }


def run_together(runs: dict, out: Path, smoke: bool) -> list:
    started = {name: start_fit(name, overrides, out, smoke) for name, overrides in runs.items()}
    for process, _, _ in started.values():
        process.wait()
    return [summarize(name, *launched) for name, launched in started.items()]


def table(rows: list) -> str:
    headers = [key for key in rows[0] if not key.startswith("_")]
    for row in rows:
        headers += [key for key in row if key not in headers and not key.startswith("_")]
    return markdown_table(headers, [[row.get(key, "-") for key in headers] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps; prints, writes nothing")
    parser.add_argument("--log_dir", help="where the runs' logs and checkpoints go (default: a temporary folder)")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("error: no GPU found; this benchmark is for a GPU (use --smoke to check it on a CPU)")
    if 1 in args.stages and not args.smoke:
        bench_throughput.main(["--rounds", "3", "--steps", "200", "--skip", "50"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.log_dir or tmp)
        if 2 in args.stages:
            runs = {name: COMPILED + overrides for name, overrides in VARIANTS.items()}
            runs[f"FSDP2 (configs/fsdp.yaml), 1 device, {FSDP_STEPS} steps"] = FSDP
            rows = run_together(runs, out / "sweep", args.smoke)
            text = (
                f"Settings of {SETTING} The runs shared the one GPU, so their wall times and tokens/s are not one "
                f"run's. Beside them, a {FSDP_STEPS}-step run of configs/fsdp.yaml (FSDP2 through "
                "ModelParallelStrategy, one device) whose checkpoint PicoGPT.from_checkpoint loads: `python -m "
                "picogpt_lightning fit --config configs/pretrain.yaml --config configs/fsdp.yaml --trainer.max_steps "
                f"{FSDP_STEPS} --trainer.val_check_interval {FSDP_STEPS}` (more GPUs: README.md, \"Scaling\")."
            )
            report("pretrain_gpu_sweep", "Pretraining on one GPU: dropout and schedule", 2, text, rows, args.smoke)
        if 3 in args.stages:
            rows = run_together({"configs/pretrain.yaml": COMPILED}, out / "recipe", args.smoke)
            title = "Pretraining on one GPU (configs/pretrain.yaml)"
            report("pretrain_gpu", title, 3, f"{SETTING} Alone on the GPU.", rows, args.smoke)


def report(section: str, title: str, stage: int, text: str, rows: list, smoke: bool) -> None:
    if smoke:
        print(table(rows), flush=True)
        return
    body = f"{machine_description()}. `python -m benchmarks.bench_gpu --stages {stage}`: {text}\n\n{table(rows)}"
    write_section(section, title, body)


if __name__ == "__main__":
    main()
