"""Seconds from SIGTERM to the exit, during training and during validation (configs/pretrain_cpu.yaml).

    python -m benchmarks.bench_signals [--repeats 3]   (from the repository root)

SLURM and Kubernetes give a job 30 s between SIGTERM and SIGKILL. Each repeat starts the CPU
pretraining recipe through the command line, validating every 20 steps over nanoGPT's 200
batches, sends SIGTERM at a step or in the middle of a validation, and times the exit; the run
reports how long its own saves (interrupted-step=N.ckpt and last.ckpt) took. What is left is the
step or validation batch under way, Lightning's teardown and the interpreter's exit.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

from benchmarks.report import machine_description, markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "pretrain_cpu.yaml"
PHASES = {  # where the signal lands: the line the run prints there
    "training": r"phase: train step 5$",
    "validation": r"phase: validation batch 50 step 20$",
}


class PhaseMarks(Callback):
    """Prints a `phase: ...` line at each step and validation batch, so the benchmark knows where the run is."""

    @staticmethod
    def mark(text: str) -> None:
        sys.stderr.write(f"phase: {text}\n")
        sys.stderr.flush()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mark(f"train step {trainer.global_step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.mark(f"validation batch {batch_idx} step {trainer.global_step}")


def interrupted_run(phase: str, out: Path) -> dict:
    """One run, SIGTERM where `phase` says: seconds to the exit, of which the saves, and the exit status."""
    command = [
        sys.executable, "-m", "picogpt_lightning", "fit", "--config", str(CONFIG),
        "--trainer.max_steps=200", "--trainer.val_check_interval=20", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}", "--trainer.callbacks+=benchmarks.bench_signals.PhaseMarks",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    batch_times = []
    for line in process.stderr:
        if line.startswith("phase: validation batch"):
            batch_times.append(time.monotonic())
        if re.search(PHASES[phase], line):
            break
    else:
        raise RuntimeError(f"the run ended before its {phase} (status {process.wait()})")
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=300)[1]
    seconds = time.monotonic() - start
    saved = re.search(r"saved step (\d+) to .* in ([\d.]+) s", rest)
    per_batch = (batch_times[-1] - batch_times[0]) / (len(batch_times) - 1) if len(batch_times) > 1 else None
    return {"seconds": seconds, "save": float(saved.group(2)) if saved else float("nan"),
            "status": process.returncode, "step": int(saved.group(1)) if saved else None, "per_batch": per_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows, per_batch, load = [], [], os.getloadavg()[0]
    for phase in PHASES:
        results = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                results.append(interrupted_run(phase, Path(out)))
            print(phase, results[-1], flush=True)
        per_batch += [r["per_batch"] for r in results if r["per_batch"]]
        seconds, saves = [r["seconds"] for r in results], [r["save"] for r in results]
        rows.append([
            phase, len(results), f"{statistics.median(seconds):.2f}", f"{max(seconds):.2f}",
            f"{statistics.median(saves):.2f}", f"{statistics.median(seconds) - statistics.median(saves):.2f}",
            ", ".join(sorted({str(r["status"]) for r in results})),
        ])
    batch = statistics.median(per_batch)
    body = "\n".join([
        "`python -m benchmarks.bench_signals`: configs/pretrain_cpu.yaml (0.86M parameters) through the command line,",
        "validating every 20 steps over 200 batches; SIGTERM at step 5, or at the 50th batch of the validation at step 20.",
        "Seconds from the signal to the exit; the saves (interrupted-step=N.ckpt and last.ckpt) as the run reports them;",
        "the rest is the step or validation batch under way, Lightning's teardown and the interpreter's exit.",
        "",
        markdown_table(["SIGTERM during", "runs", "to exit, median (s)", "max (s)", "saves, median (s)",
                        "rest, median (s)", "exit status"], rows),
        "",
        f"A validation batch took {batch:.2f} s (median; {min(per_batch):.2f} to {max(per_batch):.2f}), so a full "
        f"validation about {200 * batch:.0f} s; none starts after the signal, and SLURM and Kubernetes send SIGKILL "
        "30 s after SIGTERM.",
        f"Machine: {machine_description()}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(the machine is shared).",
    ])
    write_section("signals", "Reliability: signals", body)


if __name__ == "__main__":
    main()
