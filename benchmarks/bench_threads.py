"""`fit` beside another CPU-bound process: the program's own thread defaults against explicit settings.

    python -m benchmarks.bench_threads [--steps 150]

Each setting runs `fit --config configs/pretrain_cpu.yaml --trainer.max_steps N` without validation
while a torch matmul loop on every core runs beside it, and reads the run's final it/s from its
progress bar. "program defaults" leaves OMP_NUM_THREADS and OMP_WAIT_POLICY unset, so the program
chooses (cli.set_thread_defaults); "torch defaults" is what a run got before it chose.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import machine_description, markdown_table, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
# (label, environment changes; None removes the variable)
SETTINGS = [
    ("program defaults", {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None}),
    ("OMP_NUM_THREADS=1, OMP_WAIT_POLICY=PASSIVE", {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}),
    ("OMP_NUM_THREADS=2, OMP_WAIT_POLICY=PASSIVE", {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}),
    (f"torch defaults (OMP_NUM_THREADS={CORES}, no wait policy)", {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": None}),
]
EXPLICIT = SETTINGS[1:3]  # "the best explicit setting" is the faster of these
LOAD = f"import torch\ntorch.set_num_threads({CORES})\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
SPEED = re.compile(r"([\d.]+)it/s")


def environment(changes: dict) -> dict:
    env = {**os.environ, "COLUMNS": "120"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_fit(changes: dict, steps: int, save_dir: str) -> tuple:
    """(it/s from the progress bar's last reading, wall seconds) of one fit under load."""
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=environment({"OMP_WAIT_POLICY": "PASSIVE"}))
    try:
        time.sleep(2)  # the load is running before the fit starts
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "picogpt_lightning", "fit", "--config", "configs/pretrain_cpu.yaml",
             "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
             "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", save_dir],
            cwd=REPO_ROOT, env=environment(changes), capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
    finally:
        load.kill()
        load.wait()
    if result.returncode != 0:
        raise SystemExit(f"fit failed:\n{result.stdout}\n{result.stderr}")
    speeds = SPEED.findall(result.stdout + result.stderr)
    if not speeds:
        raise SystemExit(f"no it/s in the fit's output:\n{result.stdout}")
    return float(speeds[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    measured = {}
    with TemporaryDirectory() as save_dir:
        for label, changes in SETTINGS:
            measured[label] = run_fit(changes, args.steps, save_dir)
            print(f"{label}: {measured[label][0]:.2f} it/s, {measured[label][1]:.1f} s", flush=True)
    best_label = max((label for label, _ in EXPLICIT), key=lambda label: measured[label][0])
    default_speed, best_speed = measured["program defaults"][0], measured[best_label][0]
    rows = [(label, f"{speed:.2f}", f"{wall:.1f}", f"{best_speed / speed:.2f}x") for label, (speed, wall) in measured.items()]
    body = (
        f"{machine_description()}, {CORES} cores. `python -m benchmarks.bench_threads --steps {args.steps}`: "
        f"`fit --config configs/pretrain_cpu.yaml --trainer.max_steps {args.steps}` (validation off) while a "
        f"torch matmul loop on all {CORES} cores runs beside it. it/s: the progress bar's last reading; wall "
        "time includes start-up.\n\n"
        + markdown_table(["setting", "it/s", "wall s", "best explicit it/s / this"], rows)
        + f"\n\nThe program's defaults run at {default_speed:.2f} it/s, the best explicit setting ({best_label}) at "
        f"{best_speed:.2f}: the best is {best_speed / default_speed:.2f}x the defaults (target: at most 1.5x)."
    )
    write_section("cpu_threads", "CPU threads under load", body)


if __name__ == "__main__":
    main()
