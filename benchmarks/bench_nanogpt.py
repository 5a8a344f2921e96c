"""`fit --config configs/pretrain_cpu.yaml` against nanoGPT's train.py on the same model, batch and data.

    python -m benchmarks.bench_nanogpt --nanogpt /path/to/nanoGPT [--rounds 3] [--steps 60]

Fetches nothing: train.py, model.py and configurator.py are copied from --nanogpt into a
temporary directory, beside nanoGPT's data/shakespeare_char/{train,val}.bin and meta.pkl built
here from the project's corpus as nanoGPT's prepare.py builds them (sorted characters, the
first 90% for training). Both run the shakespeare_char CPU model (4 layers x 128, block 64,
batch 12, lr 1e-3, AdamW betas (0.9, 0.99), fp32) as whole processes, each setting once per
round, the rounds interleaved, on a quiet machine and beside one busy process (a torch matmul
loop on every core). Both evaluate two batches before their first step (nanoGPT's iter-0
estimate with --eval_iters=1; Lightning's sanity check).

Per-step time: the median step from the 10th on, start of one step to start of the next
(nanoGPT's own `time` per iter; for fit, benchmarks/step_clock.py). Time to first step: from
starting the process to the first step's end, read from the line each prints then.
"""

import argparse
import contextlib
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_DYNAMIC", "MKL_NUM_THREADS")
LOAD = f"import torch\ntorch.set_num_threads({CORES})\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
# explicit settings either program may be given; "nothing set" is measured beside them. OMP_WAIT_POLICY=ACTIVE
# is left out: on a shared machine its spinning workers took 4-20x as long a step (docs/training-and-resuming.md)
EXPLICIT = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    f"{CORES} threads, PASSIVE": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE"},
    f"{CORES} threads, libgomp's default spin": {"OMP_NUM_THREADS": str(CORES)},
}
NANOGPT_FILES = ("train.py", "model.py", "configurator.py")
NANOGPT_STEP = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def build_nanogpt(nanogpt: Path, corpus: str, where: Path) -> Path:
    """nanoGPT's files and its shakespeare_char data, as data/shakespeare_char/prepare.py writes them."""
    for name in NANOGPT_FILES:
        shutil.copy(nanogpt / name, where / name)
    data_dir = where / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    with open(corpus, encoding="utf-8") as file:
        text = file.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    split = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:split]], dtype=np.uint16).tofile(data_dir / "train.bin")
    np.array([stoi[c] for c in text[split:]], dtype=np.uint16).tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as file:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, file)
    return where


def nanogpt_command(steps: int, out_dir: str) -> list:
    return [
        sys.executable, "train.py", "--dataset=shakespeare_char", "--device=cpu", "--compile=False",
        "--dtype=float32", "--eval_iters=1", f"--eval_interval={steps * 10}", "--log_interval=1",
        "--gradient_accumulation_steps=1", "--batch_size=12", "--block_size=64", "--n_layer=4", "--n_head=4",
        "--n_embd=128", "--dropout=0.0", "--learning_rate=1e-3", f"--max_iters={steps}", "--lr_decay_iters=2000",
        "--min_lr=1e-4", "--beta2=0.99", "--warmup_iters=100", "--always_save_checkpoint=False",
        f"--out_dir={out_dir}",
    ]


def fit_command(steps: int, save_dir: str) -> list:
    return [
        sys.executable, "-m", "picogpt_lightning", "fit", "--config", "configs/pretrain_cpu.yaml",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", str(steps),
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", save_dir,
        "--trainer.callbacks+=benchmarks.step_clock.StepClock",
    ]


def environment(changes: dict) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT), **changes}


@contextlib.contextmanager
def machine_state(name: str):
    """Nothing for "quiet"; for "busy", a torch matmul loop on every core for the block's duration."""
    if name != "busy":
        yield
        return
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=environment({"OMP_WAIT_POLICY": "PASSIVE"}))
    time.sleep(2)  # its threads are running before the first measured process starts
    try:
        yield
    finally:
        load.kill()
        load.wait()


def run(program: str, changes: dict, steps: int, nano_dir: Path, scratch: str) -> tuple:
    """(median ms per step, seconds to the first step's end) of one whole process."""
    if program == "nanoGPT":
        command, cwd = nanogpt_command(steps, scratch), nano_dir
    else:
        command, cwd = fit_command(steps, scratch), REPO_ROOT
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=environment(changes), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    first_step, steps_ms, lines = None, [], []
    for line in process.stdout:
        lines.append(line)
        if program == "nanoGPT":
            match = NANOGPT_STEP.match(line)
            if match and first_step is None:
                first_step = time.perf_counter() - start
            if match and int(match.group(1)) >= 10:
                steps_ms.append(float(match.group(2)))
        elif line.startswith("first_step_end"):
            first_step = time.perf_counter() - start
        elif line.startswith("step_ms"):
            steps_ms.append(float(line.split()[1]))
    if process.wait() != 0 or first_step is None:
        raise SystemExit(f"{program} failed:\n{''.join(lines[-30:])}")
    return statistics.median(steps_ms[9:] if program == "fit" else steps_ms), first_step


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def measure(args, nano_dir: Path, scratch: str) -> dict:
    settings = [("fit", "nothing set", {}), ("nanoGPT", "nothing set", {})]
    settings += [(program, label, env) for label, env in EXPLICIT.items() for program in ("fit", "nanoGPT")]
    results = {}  # (condition, program, label) -> [(ms, first step s)]
    loads = {"quiet": [], "busy": []}
    for round_number in range(args.rounds):
        for name in ("quiet", "busy"):
            with machine_state(name):
                for program, label, env in settings:
                    loads[name].append(os.getloadavg()[0])
                    result = run(program, env, args.steps, nano_dir, scratch)
                    results.setdefault((name, program, label), []).append(result)
                    print(f"round {round_number} {name:5} {program:7} {label:40} "
                          f"{result[0]:7.1f} ms/step {result[1]:5.2f} s to first step  load {load_average()}", flush=True)
    return results, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", help="a nanoGPT checkout (its train.py, model.py, configurator.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if not args.nanogpt or not all((Path(args.nanogpt) / name).is_file() for name in NANOGPT_FILES):
        print("skipped: no nanoGPT checkout given (--nanogpt /path/to/nanoGPT with train.py, model.py, configurator.py)")
        return
    from benchmarks.report import machine_description, write_section
    from picogpt_lightning.data.source import find_corpus

    with TemporaryDirectory() as nano, TemporaryDirectory() as scratch:
        nano_dir = build_nanogpt(Path(args.nanogpt), str(find_corpus()), Path(nano))
        results, loads = measure(args, nano_dir, scratch)
    write_section("cpu_nanogpt", "CPU training against nanoGPT", report(args, results, loads, machine_description()))


def median(values):
    return statistics.median(values)


def report(args, results: dict, loads: dict, machine: str) -> str:
    from benchmarks.report import markdown_table

    rows, summary = [], []
    for condition in ("quiet", "busy"):
        best = {}
        for program in ("fit", "nanoGPT"):
            labels = [label for (c, p, label) in results if c == condition and p == program and label != "nothing set"]
            best[program] = min(labels, key=lambda label: median([r[0] for r in results[(condition, program, label)]]))
        for (c, program, label), runs in results.items():
            if c != condition:
                continue
            step = median([r[0] for r in runs])
            first = median([r[1] for r in runs])
            nano_step = median([r[0] for r in results[(condition, "nanoGPT", best["nanoGPT"])]])
            mark = " (best)" if label == best[program] else ""
            rows.append((condition, program, label + mark, f"{step:.1f}", f"{first:.2f}", f"{nano_step / step:.2f}x"))
        for program in ("fit", "nanoGPT"):
            default = median([r[0] for r in results[(condition, program, "nothing set")]])
            top = median([r[0] for r in results[(condition, program, best[program])]])
            summary.append(f"{condition}, {program}: nothing set {default:.1f} ms, best ({best[program]}) {top:.1f} ms: "
                           f"{default / top:.2f}x the best (target <= 1.1x)")
        fit_best = median([r[0] for r in results[(condition, "fit", best["fit"])]])
        nano_best = median([r[0] for r in results[(condition, "nanoGPT", best["nanoGPT"])]])
        fit_first = median([r[1] for r in results[(condition, "fit", "nothing set")]])
        nano_first = median([r[1] for r in results[(condition, "nanoGPT", "nothing set")]])
        summary.append(f"{condition}: best against best, fit's speed is {nano_best / fit_best:.2f}x nanoGPT's "
                       f"(target >= 0.9x); time to first step, nothing set: {fit_first:.2f} s against "
                       f"{nano_first:.2f} s, {fit_first / nano_first:.2f}x (target <= 1.3x)")
    load_line = ", ".join(f"{c}: {min(v):.2f}-{max(v):.2f}" for c, v in loads.items())
    return (
        f"{machine}, {CORES} cores, shared with other work (1-minute load average at each run's start, {load_line}). "
        f"`python -m benchmarks.bench_nanogpt --nanogpt PATH --rounds {args.rounds} --steps {args.steps}`: "
        f"{args.steps} steps of each program as a whole process, every setting once per round, {args.rounds} "
        "interleaved rounds; medians over rounds. \"busy\": beside a torch matmul loop on every core. "
        "ms/step: the median step from the 10th on; first step: process start to the first step's end. "
        "nanoGPT/this: nanoGPT's best setting's ms/step over this row's (above 1: this row is faster).\n\n"
        + markdown_table(["condition", "program", "setting", "ms/step", "first step s", "nanoGPT best / this"], rows)
        + "\n\n" + "\n".join(f"- {line}" for line in summary)
    )


if __name__ == "__main__":
    main()
