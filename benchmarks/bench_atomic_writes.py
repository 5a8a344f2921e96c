"""What a SIGKILL at any moment of a checkpoint write leaves behind: the project's writer vs Lightning's.

    python benchmarks/bench_atomic_writes.py [--size_mb 64] [--kills 20]

A good `last.ckpt` (step 1) is rewritten with a new state (step 2) by a forked process, which is
SIGKILLed at `kills` moments spread evenly over a write's measured duration. The run directory is
on the disk, $TMPDIR on another filesystem (/dev/shm), as on a cluster whose /tmp is local. After
each kill: is `last.ckpt` whole (the old state or the new one), and how many bytes lie anywhere
else, in the run directory or in $TMPDIR? Leftovers are removed between kills, so each is counted
once. Writes the table to BENCHMARKS.md (section atomic_writes).
"""

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

from benchmarks.report import machine_description, markdown_table, write_section  # noqa: E402
from picogpt_lightning.checkpoint_io import AtomicCheckpointIO  # noqa: E402

WRITERS = {"picogpt_lightning AtomicCheckpointIO": AtomicCheckpointIO, "Lightning TorchCheckpointIO": TorchCheckpointIO}


def payload(step: int, size_mb: int) -> dict:
    weights = torch.full((size_mb * 2**20 // 4,), float(step))
    return {"state_dict": {"model.weight": weights}, "global_step": step, "pytorch-lightning_version": "2"}


def write_in_child(writer, state: dict, path: Path) -> tuple:
    """Forks a process that saves `state` to `path`; returns (its pid, the time its write began)."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say "starting", write, exit without Python's cleanup
        os.close(ready_read)
        os.write(ready_write, b"x")
        writer.save_checkpoint(state, str(path))
        os._exit(0)
    os.close(ready_write)
    os.read(ready_read, 1)
    os.close(ready_read)
    return pid, time.perf_counter()


def write_seconds(writer, state: dict, path: Path) -> float:
    pid, started = write_in_child(writer, state, path)
    os.waitpid(pid, 0)
    return time.perf_counter() - started


def last_ckpt_state(path: Path) -> str:
    try:
        return {1: "old", 2: "new"}.get(torch.load(path, weights_only=True, mmap=True)["global_step"], "broken")
    except Exception:  # noqa: BLE001 - truncated, empty or missing: not a checkpoint any more
        return "broken" if path.exists() else "missing"


def leftovers(directory: Path, keep: Path) -> list:
    return [path for path in directory.rglob("*") if path.is_file() and path != keep]


def kill_trials(writer_class, run_dir: Path, tmpdir: Path, size_mb: int, kills: int) -> dict:
    writer, last = writer_class(), run_dir / "last.ckpt"
    good, new = payload(1, size_mb), payload(2, size_mb)
    AtomicCheckpointIO().save_checkpoint(good, str(last))
    duration = statistics.median(write_seconds(writer, new, run_dir / "timing.ckpt") for _ in range(3))
    (run_dir / "timing.ckpt").unlink()
    counts = {"old": 0, "new": 0, "broken": 0, "missing": 0}
    files = left_bytes = tmp_bytes = mistaken = 0
    for k in range(1, kills + 1):
        pid, started = write_in_child(writer, new, last)
        time.sleep(max(0.0, started + duration * k / (kills + 1) - time.perf_counter()))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        state = last_ckpt_state(last)
        counts[state] += 1
        stray = leftovers(run_dir, last)
        files += bool(stray)
        left_bytes = max(left_bytes, sum(path.stat().st_size for path in stray))
        mistaken += sum(path.suffix == ".ckpt" for path in stray)
        in_tmp = leftovers(tmpdir, last)
        tmp_bytes = max(tmp_bytes, sum(path.stat().st_size for path in in_tmp))
        for path in stray + in_tmp:
            path.unlink()
        if state != "old":
            AtomicCheckpointIO().save_checkpoint(good, str(last))  # the next kill starts from a good file again
    return {"seconds": duration, **counts, "files": files, "bytes": left_bytes, "tmp_bytes": tmp_bytes, "mistaken": mistaken}


def stale_temporary_removed(run_dir: Path, size_mb: int) -> bool:
    """After a SIGKILL left a temporary file, does the next write of the same checkpoint remove it?"""
    writer, last = AtomicCheckpointIO(), run_dir / "last.ckpt"
    pid, _ = write_in_child(writer, payload(2, size_mb), last)
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    writer.save_checkpoint(payload(1, size_mb), str(last))
    return not leftovers(run_dir, last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=int, default=64, help="size of the checkpoint written")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs spread over one write")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the forked writers run no parallel kernels
    work = Path(tempfile.mkdtemp(prefix="bench_atomic_writes.", dir=Path(__file__).resolve().parent))
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_atomic_writes.", dir="/dev/shm"))
    os.environ["TMPDIR"], tempfile.tempdir = str(tmpdir), str(tmpdir)  # where fsspec stages Lightning's writes
    rows, results = [], {}
    try:
        for name, writer_class in WRITERS.items():
            run_dir = work / name.split()[0]
            run_dir.mkdir()
            r = results[name] = kill_trials(writer_class, run_dir, tmpdir, args.size_mb, args.kills)
            rows.append([name, f"{r['seconds']:.2f}", f"{r['old']} / {r['new']} / {r['broken'] + r['missing']}",
                         r["files"], f"{r['bytes']:,}", f"{r['tmp_bytes']:,}", r["mistaken"]])
            print(rows[-1], flush=True)
        stale_removed = stale_temporary_removed(work / "picogpt_lightning", args.size_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmpdir, ignore_errors=True)
    lightning = results["Lightning TorchCheckpointIO"]
    headers = ["writer", "write (s)", "last.ckpt after the kill: old / new / broken", "kills that left a file beside it",
               "most bytes one kill left beside it", "most bytes one kill left in $TMPDIR", "left files named *.ckpt"]
    body = (
        f"`python benchmarks/bench_atomic_writes.py --size_mb {args.size_mb} --kills {args.kills}` on {machine_description()}. "
        f"A good `last.ckpt` of {args.size_mb} MiB is rewritten by a forked process, SIGKILLed at {args.kills} moments "
        "spread evenly over one write's measured duration; the run directory is on the disk, $TMPDIR on /dev/shm "
        "(another filesystem). Leftovers are measured and removed after each kill.\n\n"
        + markdown_table(headers, rows)
        + "\n\nThe project's writer leaves `last.ckpt` whole after every kill (the previous state, or the new one once "
        "the rename happened). What it can leave is its hidden temporary file (`.last.ckpt.<pid>.<random>.tmp`, never "
        "`*.ckpt`), as a SIGKILLed process cannot clean up; the next write of the same checkpoint removes it: "
        f"{'yes' if stale_removed else 'NO'} in this run. Lightning's own writer stages the file in $TMPDIR and then "
        f"copies it across filesystems; {lightning['broken'] + lightning['missing']} of its {args.kills} kills left `last.ckpt` truncated "
        "or gone (a kill during that copy)."
    )
    write_section("atomic_writes", "Reliability: checkpoint writes", body)


if __name__ == "__main__":
    main()
