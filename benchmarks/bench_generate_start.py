"""Time to first token of `generate` from the shell, against what no command can avoid.

    flock /tmp/picogpt_bench.lock python -m benchmarks.bench_generate_start [--ckpt CKPT] [--repeats 5]
                                                                           [--before REF]

Each row is a fresh process started from the shell, timed from its start to the first byte
of the first generated token on its stdout (the prompt is printed before decoding starts):
- `import torch` alone, printing one byte: the floor of any PyTorch program;
- `import torch` and transformers' GenerationConfig: the floor of one that uses transformers' settings;
- `generate --prompt "ROMEO:"` (500 new tokens, greedy), first token and the whole run;
- with `--before REF`, the same command from that git revision (checked out into a temporary
  worktree), to show what the start-up change bought.
Then the issue's command, `generate --max_new_tokens 500 --num_samples 3`, counting its samples.
The runs take turns, so a change in machine load weighs on all rows alike; medians are reported.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:"
SEPARATOR = "-" * 40


def first_byte_after(command, skip: int, env=None, cwd=None):
    """Seconds to the first stdout byte past `skip` bytes, seconds to exit, and the output."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, cwd=cwd)
    out, first = b"", None
    while True:
        byte = process.stdout.read(1)
        if not byte:
            break
        out += byte
        if first is None and len(out) > skip:
            first = time.perf_counter() - start
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed with status {process.returncode}")
    return first, time.perf_counter() - start, out.decode()


def generate_command(ckpt: str, *flags: str):
    return [sys.executable, "-m", "picogpt_lightning", "generate", "--ckpt", ckpt, "--prompt", PROMPT, *flags]


def runs_for(ckpt: str, before_tree):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    runs = {
        "import torch": ([sys.executable, "-c", "import torch; print('x', flush=True)"], 0, env, ROOT),
        "import torch + GenerationConfig": (
            [sys.executable, "-c", "import torch; from transformers import GenerationConfig; print('x', flush=True)"], 0, env,
            ROOT,
        ),
        "generate (this version)": (generate_command(ckpt), len(PROMPT), env, ROOT),
    }
    if before_tree is not None:  # `python -m` puts the working directory first on sys.path: run from that tree
        runs["generate (before)"] = (generate_command(ckpt), len(PROMPT), {**env, "PYTHONPATH": str(before_tree)}, before_tree)
    return runs


def measure(runs, repeats: int):
    """Median first-byte and exit seconds per run, the runs taking turns."""
    firsts, totals = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, (command, skip, env, cwd) in runs.items():
            first, total, _ = first_byte_after(command, skip, env, cwd=cwd)
            firsts[name].append(first)
            totals[name].append(total)
    return {name: (statistics.median(firsts[name]), statistics.median(totals[name])) for name in runs}


def samples_check(ckpt: str):
    """The issue's command: three 500-token samples of a block-64 model, and how long they take."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    command = generate_command(ckpt, "--max_new_tokens", "500", "--num_samples", "3")
    _, total, out = first_byte_after(command, 0, env, cwd=ROOT)
    samples = out.rstrip("\n").split("\n" + SEPARATOR + "\n")
    return [len(text) - len(PROMPT) for text in samples], total, samples[0]


def with_worktree(ref: str):
    directory = tempfile.mkdtemp(prefix="picogpt_before_")
    subprocess.run(["git", "worktree", "add", "--detach", directory, ref], cwd=ROOT, check=True, capture_output=True)
    return Path(directory)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="runs/pretrain_cpu/version_0/checkpoints/best.ckpt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default=None, help="a git revision to compare with (e.g. the one before a change)")
    args = parser.parse_args()
    ckpt = str(Path(args.ckpt).absolute())
    if not Path(ckpt).is_file():
        raise SystemExit(f"no checkpoint at {ckpt}; train one: python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml")
    load_start = os.getloadavg()[0]
    before_tree = with_worktree(args.before) if args.before else None
    try:
        results = measure(runs_for(ckpt, before_tree), args.repeats)
    finally:
        if before_tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, capture_output=True)
    lengths, samples_seconds, first_sample = samples_check(ckpt)
    floor = results["import torch"][0]
    rows = [
        [name, f"{first:.2f}", f"{total:.2f}", f"{first - floor:+.2f}"] for name, (first, total) in results.items()
    ]
    table = markdown_table(["process", "first byte (s)", "exit (s)", "over import torch (s)"], rows)
    body = f"""`flock /tmp/picogpt_bench.lock python -m benchmarks.bench_generate_start{' --before ' + args.before if args.before else ''}` on CPU ({os.cpu_count()} cores), the pretrain_cpu checkpoint (4 layers x 128, block 64), prompt "{PROMPT}", greedy, 500 new tokens. Median of {args.repeats} alternating runs, each a fresh process timed from its start to its first byte of output past the prompt (for the `import` rows, the one byte printed after the imports). Load average (1 min) at start and end: {load_start:.1f}, {os.getloadavg()[0]:.1f}.

{table}

`generate` imports torch, the model, transformers' GenerationConfig and logits processors and the `tokenizers` backend; it loads no Lightning, no LightningCLI and no transformers tokenizer. The last column is what each process adds to `import torch`: for `generate`, transformers' generation settings, jsonargparse reading its flags, the checkpoint, the model and the prompt's forward pass.

The issue's command, `generate --ckpt <pretrain_cpu best.ckpt> --max_new_tokens 500 --num_samples 3`: {len(lengths)} samples of {', '.join(map(str, lengths))} new tokens (characters), {samples_seconds:.1f} s in all. The first sample begins:

```
{first_sample[:300]}
```
"""
    write_section("generate_start", "Generation: time to first token from the shell", body)


if __name__ == "__main__":
    main()
