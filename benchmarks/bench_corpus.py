"""Corpora: `prepare`'s throughput against the tokenizer's own batch encoder, and `fit` over stores of 10 MB to 1 GB.

    python -m benchmarks.bench_corpus [--work DIR] [--rounds 3] [--steps 300] [--smoke]

1. Throughput: tiny_shakespeare repeated to 20 MB. The same tokenizer (char, and a 4096-token
   byte-level BPE) encodes the same 64 KiB sections with `encode_batch` on every core, all in
   memory; `prepare` reads the file, encodes it and writes the store, with that tokenizer loaded
   from a folder (no training), and also end to end (its tokenizer made from the data).
2. `fit`: pretrain_cpu.yaml's model and batch over char stores of 10 MB, 100 MB and 1 GB
   (tiny_shakespeare repeated, prepared once), and over tiny_shakespeare itself
   (TinyShakespeareDataModule), validation off, in interleaved rounds of whole processes: each
   process's peak resident memory (wait4), its time from start to the end of its first step, and
   its steps/s over the steps after the 10th (a callback stamps each step's end).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import lightning as L
import yaml

from benchmarks.report import machine_description, markdown_table, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
STAMPS_ENV = "BENCH_STEP_STAMPS"
SPLIT = ["--val_fraction", "0.1"]  # --smoke's small texts have too few 64 KiB sections for 0.1


class StepStamps(L.Callback):
    """Appends time.time() at every training step's end to the file $BENCH_STEP_STAMPS, and the peak resident
    memory of the process and its data workers at the end (VmHWM: getrusage's maxrss would count the benchmark's
    own memory at the fork)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(os.environ[STAMPS_ENV], "a") as file:
            file.write(f"{time.time()}\n")

    def on_train_end(self, trainer, pl_module):
        # the training process and its data-loading workers, which are alive until the fit returns
        children = [pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]
        peak_kb = sum(peak_resident_kb(Path("/proc") / pid) for pid in ["self", *children])
        Path(os.environ[STAMPS_ENV] + ".peak").write_text(str(peak_kb))


def peak_resident_kb(process: Path) -> int:
    return int((process / "status").read_text().split("VmHWM:")[1].split()[0])


def corpus(path: Path, megabytes: float) -> Path:
    """tiny_shakespeare repeated (and cut) to `megabytes` of text."""
    if not path.exists():
        from picogpt_lightning.data import find_corpus

        text = find_corpus().read_text()
        size = int(megabytes * 1e6)
        with open(path, "w") as file:
            for _ in range(size // len(text)):
                file.write(text)
            file.write(text[: size % len(text)])
    return path


def prepare_cli(source: Path, out: Path, *args: str) -> float:
    """Seconds of `python -m picogpt_lightning prepare` (whole process)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "picogpt_lightning", "prepare", "--source", str(source), "--out", str(out),
                    *SPLIT, *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def throughput(work: Path, megabytes: float) -> list:
    from picogpt_lightning.corpus import TokenStore
    from picogpt_lightning.corpus.sections import sections

    source = corpus(work / f"throughput_{megabytes:g}mb.txt", megabytes)
    text = source.read_text()
    size = len(text.encode())
    pieces = [piece for piece, _ in sections([text])]
    rows = []
    for kind, args in [("char", []), ("bpe 4096", ["--tokenizer", "bpe", "--vocab_size", "4096"])]:
        made = work / f"made_{kind.split()[0]}"
        end_to_end = prepare_cli(source, made, *args)  # the tokenizer made from the data, then everything tokenized
        tokenizer_dir = work / f"tokenizer_{kind.split()[0]}"
        store = TokenStore(made)
        store.tokenizer.save(tokenizer_dir)
        tokens = sum(store.manifest["splits"][split]["tokens"] for split in ("train", "val"))
        loaded = prepare_cli(source, work / "loaded", "--tokenizer", str(tokenizer_dir))
        backend = store.tokenizer.backend
        start = time.perf_counter()
        backend.encode_batch(pieces, add_special_tokens=False)
        encode = time.perf_counter() - start
        rows.append((kind, f"{size / 1e6 / encode:.2f}", f"{tokens / 1e6 / encode:.2f}",
                     f"{size / 1e6 / loaded:.2f}", f"{tokens / 1e6 / loaded:.2f}", f"{encode / loaded:.2f}x",
                     f"{size / 1e6 / end_to_end:.2f}"))
        print(rows[-1], flush=True)
    return rows


def fit_config(work: Path, store: Path | None) -> Path:
    config = yaml.safe_load((REPO_ROOT / "configs" / "pretrain_cpu.yaml").read_text())
    if store is not None:
        config["data"] = {"class_path": "picogpt_lightning.data.TokenStoreDataModule",
                          "init_args": {"path": str(store), "block_size": 64, "batch_size": 12}}
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(work / "runs")
    config["trainer"]["callbacks"] = [{"class_path": "benchmarks.bench_corpus.StepStamps"}]
    path = work / f"fit_{store.name if store else 'tiny_shakespeare'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_fit(config: Path, steps: int, work: Path) -> tuple:
    """(peak RSS MB, seconds from process start to the first step's end, steps/s after step 10) of one fit."""
    stamps = work / "stamps.txt"
    stamps.unlink(missing_ok=True)
    Path(f"{stamps}.peak").unlink(missing_ok=True)
    command = [sys.executable, "-m", "picogpt_lightning", "fit", "--config", str(config), "--trainer.max_steps",
               str(steps), "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false"]
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, STAMPS_ENV: str(stamps)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if process.wait() != 0:
        raise SystemExit(f"fit failed: {process.stderr.read()[-2000:]}")
    times = [float(line) for line in stamps.read_text().split()]
    peak_mb = int(Path(f"{stamps}.peak").read_text()) / 1024
    return peak_mb, times[0] - start, (len(times) - 10) / (times[-1] - times[9])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_corpus", help="where corpora and stores go (about 4 GB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scale = 0.01 if args.smoke else 1.0
    if args.smoke:
        SPLIT[1] = "0.5"
    rows = throughput(work, 20 * max(scale, 0.05))
    sizes = {"10 MB": 10 * scale, "100 MB": 100 * scale, "1 GB": 1000 * scale}
    stores, prepare_rows = {}, []
    for label, megabytes in sizes.items():
        stores[label] = work / f"store_{label.replace(' ', '')}"
        timing = stores[label].with_suffix(".seconds")  # kept, so a rerun over the same stores reports them
        if not (stores[label] / "manifest.json").is_file():
            timing.write_text(str(prepare_cli(corpus(work / f"corpus_{label.replace(' ', '')}.txt", megabytes), stores[label])))
        seconds = float(timing.read_text())
        prepare_rows.append((label, f"{seconds:.0f}", f"{megabytes / seconds:.2f}"))
        print(prepare_rows[-1], flush=True)
    configs = {"tiny_shakespeare (1.1 MB)": fit_config(work, None)}
    configs.update({label: fit_config(work, store) for label, store in stores.items()})
    runs = {label: [] for label in configs}
    for _ in range(args.rounds):
        for label, config in configs.items():
            runs[label].append(run_fit(config, args.steps, work))
            print(label, runs[label][-1], flush=True)
    report(args, rows, prepare_rows, runs)


def report(args, rows, prepare_rows, runs) -> None:
    medians = {label: [median(run[i] for run in measured) for i in range(3)] for label, measured in runs.items()}
    small, large, shakespeare = medians["10 MB"], medians["1 GB"], medians["tiny_shakespeare (1.1 MB)"]
    fit_rows = [(label, f"{rss:.0f}", f"{first:.2f}", f"{speed:.2f}", f"{speed / shakespeare[2]:.3f}x")
                for label, (rss, first, speed) in medians.items()]
    body = (
        f"{machine_description()}, {CORES} cores. `python -m benchmarks.bench_corpus --rounds {args.rounds} "
        f"--steps {args.steps}`. Text: tiny_shakespeare repeated to size.\n\n"
        "`prepare` against the same tokenizer's `encode_batch` on the same 64 KiB sections and cores "
        "(in memory, encoding only); prepare's figures are whole processes that read the file and write the store, "
        "its tokenizer loaded from a folder; the last column makes the tokenizer from the data first:\n\n"
        + markdown_table(["tokenizer", "encode_batch MB/s", "M tokens/s", "prepare MB/s", "M tokens/s",
                          "prepare / encode_batch", "end to end MB/s"], rows)
        + "\n\nPreparing the stores below (char, whole processes):\n\n"
        + markdown_table(["text", "seconds", "MB/s"], prepare_rows)
        + f"\n\n`fit` with configs/pretrain_cpu.yaml's model and batch, {args.steps} steps, validation off; medians of "
        f"{args.rounds} interleaved rounds:\n\n"
        + markdown_table(["data", "peak RSS MB (with workers)", "s to first step", "steps/s", "vs tiny_shakespeare"], fit_rows)
        + f"\n\n1 GB against 10 MB: {large[0] - small[0]:+.0f} MB resident (target within +150), "
        f"{large[1] - small[1]:+.2f} s to the first step (target within +3); steps/s on the 1 GB store "
        f"{large[2] / shakespeare[2]:.3f}x tiny_shakespeare's (target >= 0.97)."
    )
    write_section("corpora", "Corpora: prepare and fit at any size", body)


if __name__ == "__main__":
    main()
