"""AdamW against Muon on pretrain_cpu.yaml's model and data: steps and seconds to a val/loss, the loss at 1000 steps.

    OMP_NUM_THREADS=1 flock /tmp/lane2.lock python -m benchmarks.bench_optimizers   (from the repository root)

The runs go through the CLI one after the other in this process, on the same machine and one
thread, validating every 100 steps: configs/pretrain_cpu.yaml as it is (AdamW, 2000 steps),
configs/pretrain_cpu_muon.yaml (Muon for the blocks' matrices, its schedule over 1000 steps), and
the Muon recipe over AdamW's 2000 steps. The target: Muon reaches AdamW's final val/loss (1.6684
when this benchmark was written) in at most 1000 steps.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.checkpoints import write_atomically
from picogpt_lightning.cli import main as cli_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MUON_2000 = "Muon, 2000 steps"
RUNS = {  # name: (recipe, CLI overrides)
    "AdamW": (CONFIGS / "pretrain_cpu.yaml", []),
    MUON_2000: (CONFIGS / "pretrain_cpu_muon.yaml", ["--trainer.max_steps", "2000"]),
    "Muon": (CONFIGS / "pretrain_cpu_muon.yaml", []),
}
THRESHOLD = 1.70  # a val/loss both reach: the speed comparison
ADAMW_BEFORE = {1500: 1.7279, 2000: 1.6684}  # configs/pretrain_cpu.yaml as BENCHMARKS.md had it (val every 500 steps)
TARGET = ADAMW_BEFORE[2000]  # Muon should reach AdamW's 2000-step val/loss within TARGET_STEPS
TARGET_STEPS = 1000

# The runs that chose configs/pretrain_cpu_muon.yaml's settings, measured once on the same machine (2 cores
# shared with other work, one thread): pretrain_cpu.yaml with the optimizer arguments as CLI overrides,
# 1000 steps (the schedule's length), val/loss on the 2400 windows after the last step. "fused": the qkv
# weight orthogonalised as one matrix (torch.optim.Muon's way); "apart": q, k and v each on its own (modules/muon.py).
TUNING = [
    # (qkv, muon_lr, muon_adjust_lr, AdamW learning_rate, min_lr, warmup_steps, muon_weight_decay, val/loss at 1000)
    ("fused", 0.04, "original", 3e-3, 1e-4, 50, 0.0, 1.8336),
    ("fused", 0.02, "original", 3e-3, 1e-4, 50, 0.0, 1.7036),
    ("fused", 0.015, "original", 3e-3, 1e-4, 50, 0.0, 1.6850),
    ("fused", 0.01, "original", 3e-3, 1e-4, 50, 0.0, 1.6839),
    ("fused", 0.0075, "original", 3e-3, 1e-4, 50, 0.0, 1.7001),
    ("fused", 0.005, "original", 3e-3, 1e-4, 50, 0.0, 1.7022),
    ("fused", 0.01, "original", 6e-3, 2e-4, 50, 0.0, 1.6806),
    ("fused", 0.01, "original", 3e-3, 1e-5, 50, 0.0, 1.6881),
    ("apart", 0.02, "original", 3e-3, 1e-4, 50, 0.0, 1.6667),
    ("apart", 0.015, "original", 6e-3, 2e-4, 50, 0.0, 1.6584),
    ("apart", 0.01, "original", 3e-3, 1e-4, 50, 0.0, 1.6422),
]


def val_curve(log_dir: Path, start: float):
    """[(steps trained, val/loss, seconds since the run started)]: Lightning logs step N - 1 after N steps."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step + 1, event.value, event.wall_time - start) for event in events.Scalars("val/loss")]


def run(config: Path, overrides, out: str, val_every: int):
    start = time.time()
    cli_main([
        "fit", "--config", str(config), *overrides,
        "--trainer.val_check_interval", str(val_every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", out,
    ])
    wall = time.time() - start
    return val_curve(next(Path(out).glob("*/version_*")), start), wall


def first_below(curve, threshold: float):
    return next(((step, seconds) for step, loss, seconds in curve if loss <= threshold), (None, None))


def at_step(curve, step: int):
    return next((loss for trained, loss, _ in curve if trained == step), None)


def summary_row(name: str, curve, wall: float):
    step, seconds = first_below(curve, THRESHOLD)
    loss_1000 = at_step(curve, TARGET_STEPS)
    return [
        name, step or "not reached", f"{seconds:.0f}" if seconds else "—",
        f"{loss_1000:.4f}" if loss_1000 else "—", f"{curve[-1][1]:.4f} at step {curve[-1][0]}", f"{wall:.0f}",
    ]


def body(curves, walls, val_every: int) -> str:
    adamw_final, muon_1000 = curves["AdamW"][-1][1], at_step(curves["Muon"], TARGET_STEPS)
    met = muon_1000 is not None and muon_1000 <= TARGET
    summary = markdown_table(
        ["optimizer", f"steps to val/loss <= {THRESHOLD}", "seconds to it", f"val/loss at step {TARGET_STEPS}",
         "final val/loss", "wall s"],
        [summary_row(name, curves[name], walls[name]) for name in RUNS],
    )
    by_step = {step: {} for name in RUNS for step, _, _ in curves[name]}
    for name in RUNS:
        for step, loss, _ in curves[name]:
            by_step[step][name] = f"{loss:.4f}"
    curve_table = markdown_table(
        ["step", *RUNS], [[step, *(by_step[step].get(name, "") for name in RUNS)] for step in sorted(by_step)]
    )
    tuning = markdown_table(
        ["q, k, v", "muon_lr", "muon_adjust_lr", "learning_rate (AdamW part)", "min_lr", "warmup", "muon_weight_decay",
         "val/loss at 1000"],
        TUNING,
    )
    return (
        f"`python -m benchmarks.bench_optimizers` on {machine_description()}, validating every {val_every} "
        "steps (seconds include validation). AdamW: configs/pretrain_cpu.yaml unchanged; Muon: "
        "configs/pretrain_cpu_muon.yaml, the same model and data, Muon for the blocks' matrices (q, k and v "
        "each its own) and AdamW for embeddings and norms (modules/muon.py), its schedule over 1000 steps; "
        f"{MUON_2000}: that recipe with AdamW's max_steps, its schedule over 2000.\n\n"
        f"**Target (Muon at val/loss <= {TARGET} within {TARGET_STEPS} steps): {'met' if met else 'not met'}**: "
        f"Muon {muon_1000:.4f} at step {TARGET_STEPS}. AdamW here: {at_step(curves['AdamW'], 1500):.4f} at step "
        f"1500, {adamw_final:.4f} at step {curves['AdamW'][-1][0]}; in BENCHMARKS.md before: {ADAMW_BEFORE[1500]} "
        f"at step 1500 (logged as 1499), {ADAMW_BEFORE[2000]} at step 2000.\n\n"
        + summary + "\n\nval/loss by steps trained:\n\n" + curve_table
        + "\n\nTuning runs for configs/pretrain_cpu_muon.yaml (1000 steps, val/loss after step 1000, "
        "each a CLI override of that recipe):\n\n" + tuning
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--val_every", type=int, default=100)
    parser.add_argument("--save", help="also write the measured curves to this JSON file")
    parser.add_argument("--render", help="write the section from a --save file instead of training")
    args = parser.parse_args()
    if args.render:
        measured = json.loads(Path(args.render).read_text())
        curves, walls = measured["curves"], measured["walls"]
    else:
        curves, walls = {}, {}
        for name in ("Muon", MUON_2000, "AdamW"):  # the shortest first; --save keeps each curve once measured
            config, overrides = RUNS[name]
            with tempfile.TemporaryDirectory() as out:
                curves[name], walls[name] = run(config, overrides, out, args.val_every)
            if args.save:
                text = json.dumps({"curves": curves, "walls": walls})
                write_atomically(args.save, lambda file: file.write(text.encode()))
    write_section("optimizers", "AdamW and Muon on pretrain_cpu (configs/pretrain_cpu_muon.yaml)",
                  body(curves, walls, args.val_every))


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
