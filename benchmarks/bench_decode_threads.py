"""Thread defaults for decoding: `generate` with nothing set against each explicit setting, quiet and busy.

    python -m benchmarks.bench_decode_threads [--rounds 2] [--tokens 400]

The decoding half of the thread defaults (bench_nanogpt.py measures training): a whole
`python -m picogpt_lightning generate` process per setting, on a random model of the pretrain_cpu
size (4 layers x 128, block 64), greedy, --tokens new characters after "ROMEO:". Its decoding
speed is read from outside: the characters written after the first one, over the time from the
first to the last. Each setting runs once per round, in an order that rotates from round to round,
rounds interleaved, on a quiet machine and
beside one busy process (a torch matmul loop on every core, as in bench_nanogpt.py). Target:
nothing set within 1.1x of the best explicit setting in both conditions.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_nanogpt import CORES, EXPLICIT, REPO_ROOT, environment, machine_state
from benchmarks.bench_serve import build_checkpoint

PROMPT = "ROMEO:"


def decode_rate(ckpt: Path, tokens: int, changes: dict) -> float:
    """Characters per second `generate` writes after its first one (one character is one token here)."""
    command = [sys.executable, "-m", "picogpt_lightning", "generate", "--ckpt", str(ckpt), "--prompt", PROMPT,
               "--max_new_tokens", str(tokens)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=environment(changes), cwd=REPO_ROOT)
    written, first, last = 0, None, None
    while process.stdout.read(1):
        written += 1
        if written > len(PROMPT):
            last = time.perf_counter()
            first = first or last
    if process.wait() != 0 or first is None or last == first:
        raise SystemExit(f"generate failed with status {process.returncode} under {changes}")
    return (written - len(PROMPT) - 1) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--smoke", action="store_true", help="one round of 50 tokens, nothing written")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.tokens = 1, 50
    settings = {"nothing set": {}, **EXPLICIT}
    rates, loads = {}, {"quiet": [], "busy": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        build_checkpoint(ckpt)
        for round_number in range(args.rounds):
            for name in ("quiet", "busy"):
                with machine_state(name):
                    labels = list(settings)
                    shift = round_number % len(labels)  # each round starts with another setting: no order bias
                    for label in labels[shift:] + labels[:shift]:
                        loads[name].append(os.getloadavg()[0])
                        rate = decode_rate(ckpt, args.tokens, settings[label])
                        rates.setdefault((name, label), []).append(rate)
                        print(f"round {round_number} {name:5} {label:40} {rate:7.0f} tokens/s", flush=True)
    from benchmarks.report import machine_description, markdown_table, write_section

    rows, summary = [], []
    for condition in ("quiet", "busy"):
        medians = {label: statistics.median(rates[(condition, label)]) for label in settings}
        best = max(EXPLICIT, key=lambda label: medians[label])
        for label in settings:
            rows.append([condition, label + (" (best)" if label == best else ""), f"{medians[label]:.0f}",
                         f"{medians[best] / medians[label]:.2f}x"])
        ratio = medians[best] / medians["nothing set"]
        summary.append(f"- {condition}: nothing set decodes {medians['nothing set']:.0f} tokens/s, the best explicit "
                       f"setting ({best}) {medians[best]:.0f}: the best is **{ratio:.2f}x** the defaults (target <= 1.1x)")
    quiet, busy = loads["quiet"], loads["busy"]
    body = (
        f"{machine_description()}, {CORES} cores. `python -m benchmarks.bench_decode_threads --rounds {args.rounds} "
        f"--tokens {args.tokens}`: `generate` (greedy, {args.tokens} new tokens, a random pretrain_cpu-size model) as a "
        f"whole process per setting, settings interleaved (their order rotating) over {args.rounds} rounds, medians "
        "over rounds; \"busy\": beside a torch matmul loop on every core. tokens/s: characters written after the "
        f"first, over the time from the first to the last. 1-minute load average at each run's start, quiet: "
        f"{min(quiet):.2f}-{max(quiet):.2f}, "
        f"busy: {min(busy):.2f}-{max(busy):.2f}.\n\n"
        + markdown_table(["condition", "setting", "tokens/s", "best / this"], rows)
        + "\n\n" + "\n".join(summary)
    )
    if args.smoke:
        print(body)
        return
    write_section("decode_threads", "CPU threads for decoding", body)


if __name__ == "__main__":
    main()
