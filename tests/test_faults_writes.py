"""Nothing lost: every file a command writes is whole or absent, and a failed write is one line.

Real faults in real subprocesses: a SIGKILL in the middle of rewriting `last.ckpt` (with $TMPDIR
on another filesystem than the run, where Lightning's own move is a plain copy), a full disk (a
small tmpfs, or an injected ENOSPC where mounting is not allowed), a read-only directory, and
outputs that would destroy the command's own input.
"""

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.checkpoint_io import AtomicCheckpointIO, with_atomic_checkpoint_io
from picogpt_lightning.tokenizer import build_tokenizer
from tiny_training import BLOCK_SIZE, tiny_config

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs the command line with torch.save wrapped: argv[1] is the fault, argv[2] a marker file the
# fault touches, the rest the command. Only writes into a temporary file of `last.ckpt` or
# `best.ckpt` (named `.last.ckpt.<pid>.<random>.tmp` by checkpoints.write_atomically) are touched.
FAULTY_PYTHON = r"""
import errno, io, os, runpy, sys, time
import torch

fault, marker = sys.argv[1], sys.argv[2]
real_save, writes = torch.save, []

def save(obj, f, *args, **kwargs):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")) if hasattr(f, "fileno") else ""
    if not name.startswith((".last.ckpt.", ".best.ckpt.")):
        return real_save(obj, f, *args, **kwargs)
    writes.append(name)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    if fault == "kill_second_last" and name.startswith(".last.ckpt.") and sum(w.startswith(".last") for w in writes) == 2:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of it on disk, then wait for the SIGKILL
        f.flush()
        open(marker, "w").close()
        time.sleep(600)
    if fault == "enospc":
        f.write(buffer.getvalue()[:4096])
        f.flush()
        open(marker, "w").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    f.write(buffer.getvalue())

torch.save = save
sys.argv = ["picogpt_lightning", *sys.argv[3:]]
runpy.run_module("picogpt_lightning", run_name="__main__", alter_sys=True)
"""


def environment(tmpdir: Path):
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PICOGPT_DEBUG": "", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}


def write_config(tmp_path: Path, corpus: Path, checkpoint_dir: Path, max_steps: int) -> Path:
    """A tiny fit validating every 2 steps, its checkpoints in `checkpoint_dir`, its logs in tmp_path/runs."""
    config = {
        "model": {"class_path": "picogpt_lightning.modules.LanguageModelModule", "init_args": {
            "config": {"block_size": BLOCK_SIZE, "n_layer": 1, "n_head": 2, "n_query_groups": 1, "n_embd": 16},
            "warmup_steps": 1, "lr_decay_steps": 10}},
        "data": {"class_path": "picogpt_lightning.data.TinyShakespeareDataModule", "init_args": {
            "data_path": str(corpus), "block_size": BLOCK_SIZE, "batch_size": 2, "train_samples": 16, "val_samples": 2}},
        "trainer": {"accelerator": "cpu", "max_steps": max_steps, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}}},
        "checkpoint": {"dirpath": str(checkpoint_dir)},
        "last_checkpoint": {"dirpath": str(checkpoint_dir)},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def faulty_command(fault: str, marker: Path, *args: str):
    return [sys.executable, "-c", FAULTY_PYTHON, fault, str(marker), *args]


def one_line_error(result) -> str:
    """The error line of a failed command, after checking it is the only thing that went wrong."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    return lines[-1]


def entries(directory: Path):
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture
def other_filesystem_tmpdir(tmp_path):
    """A $TMPDIR on another filesystem than tmp_path (/dev/shm, a tmpfs); skips where there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) beside the test directory")
    directory = Path(os.path.join(shm, f"picogpt-tmp-{os.getpid()}-{tmp_path.name}"))
    directory.mkdir()
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def mount_tmpfs(mountpoint: Path, options: str) -> bool:
    mountpoint.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], capture_output=True).returncode == 0


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs holding `previous/last.ckpt` and filled to the last byte; None where mounting is not allowed."""
    mountpoint = tmp_path / "full"
    if not mount_tmpfs(mountpoint, "size=1m"):
        yield None
        return
    try:
        (mountpoint / "previous").mkdir()
        checkpoints.save(mountpoint / "previous" / "last.ckpt", PicoGPT(tiny_config()))
        with open(mountpoint / "filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 512)
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory nothing can be written into: a read-only tmpfs as root, mode 0555 otherwise."""
    directory = tmp_path / "read_only"
    if os.geteuid() != 0:
        directory.mkdir()
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    if not mount_tmpfs(directory, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs (root cannot be kept out of a 0555 directory)")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=True)


@pytest.fixture
def trained_checkpoint(tmp_path):
    """A small full-precision checkpoint with a tokenizer, as training writes one, in tmp_path/input."""
    path = tmp_path / "input" / "model.ckpt"
    path.parent.mkdir()
    tokenizer = build_tokenizer("char", "to be or not to be")
    torch.manual_seed(0)
    checkpoints.save(path, PicoGPT(tiny_config(vocab_size=tokenizer.vocab_size, mlp="swiglu")), tokenizer)
    return path


def run(command, cwd: Path, tmpdir: Path, timeout: float = 300):
    return subprocess.run(command, cwd=cwd, env=environment(tmpdir), capture_output=True, text=True, timeout=timeout)


def command_line(*args: str):
    return [sys.executable, "-m", "picogpt_lightning", *args]


# ---- Lightning checkpoints -------------------------------------------------------------------


def test_sigkill_while_last_ckpt_is_rewritten_leaves_the_previous_one_loadable(corpus_path, tmp_path, other_filesystem_tmpdir):
    run_dir = tmp_path / "checkpoints"
    config = write_config(tmp_path, corpus_path, run_dir, max_steps=4)
    marker = tmp_path / "halfway"
    process = subprocess.Popen(faulty_command("kill_second_last", marker, "fit", "--config", str(config)), cwd=tmp_path,
                               env=environment(other_filesystem_tmpdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.stderr.read().decode()  # the second last.ckpt write is half done
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()

    # the previous last.ckpt (validation at step 2) is whole; the half-written state never took its place
    previous = checkpoints.load(run_dir / "last.ckpt")
    assert previous.global_step == 2 and torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not any(other_filesystem_tmpdir.iterdir())  # nothing was staged in $TMPDIR
    # a killed process cannot clean up: its hidden temporary file may remain, never named *.ckpt
    temporaries = [name for name in entries(run_dir) if name not in ("best.ckpt", "last.ckpt")]
    assert len(temporaries) == 1 and temporaries[0].startswith(".last.ckpt.") and temporaries[0].endswith(".tmp")
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    # config.yaml beside the logs is whole
    assert yaml.safe_load(next((tmp_path / "runs" / "tiny").glob("version_*/config.yaml")).read_text())["trainer"]

    # the next write of last.ckpt removes the dead process's temporary file
    checkpoints.write_atomically(str(run_dir / "last.ckpt"), lambda file: file.write((run_dir / "last.ckpt").read_bytes()))
    assert entries(run_dir) == ["best.ckpt", "last.ckpt"]


def test_a_full_disk_keeps_the_previous_checkpoint_leaves_nothing_partial_and_is_one_line(
    corpus_path, tmp_path, full_disk, other_filesystem_tmpdir
):
    if full_disk is None:  # no tmpfs allowed: the same fault injected into the checkpoint's write
        run_dir = tmp_path / "previous"
        checkpoints.save(run_dir / "last.ckpt", PicoGPT(tiny_config()))
        fit = faulty_command("enospc", tmp_path / "marker", "fit")
    else:
        run_dir, fit = full_disk / "previous", command_line("fit")
    before = (run_dir / "last.ckpt").read_bytes()
    config = write_config(tmp_path, corpus_path, run_dir, max_steps=2)
    result = run(fit + ["--config", str(config)], tmp_path, other_filesystem_tmpdir)

    line = one_line_error(result)
    assert line.startswith(f"error: cannot write {run_dir}/") and "No space left on device; free space" in line
    assert (run_dir / "last.ckpt").read_bytes() == before  # the previous file, intact
    assert entries(run_dir) == ["last.ckpt"]  # no partial best.ckpt or last.ckpt, no temporary file
    assert not any(other_filesystem_tmpdir.iterdir())


def test_the_atomic_checkpoint_io_joins_the_plugins_unless_the_user_chose_one():
    # (the runs above prove the command line uses it: the faults only touch its temporary files)
    plugins = with_atomic_checkpoint_io(None)
    assert len(plugins) == 1 and isinstance(plugins[0], AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert with_atomic_checkpoint_io([own]) == [own]  # a CheckpointIO the user chose is kept
    assert isinstance(with_atomic_checkpoint_io("bf16-mixed")[1], AtomicCheckpointIO)


# ---- commands: quantize, merge, export -------------------------------------------------------


COMMANDS = {
    "quantize": lambda ckpt, out: ["quantize", "--ckpt", str(ckpt), "--method", "nf4", "--out", str(out)],
    "merge": lambda ckpt, out: ["merge", "--a", str(ckpt), "--b", str(ckpt), "--t", "0.5", "--out", str(out)],
    "export": lambda ckpt, out: ["export", "--ckpt", str(ckpt), "--out", str(out)],
}


def main_error(args, tmpdir: Path, monkeypatch) -> str:
    """The one line `python -m picogpt_lightning ...` ends with, run in this process (no start-up cost)."""
    from picogpt_lightning.cli import main

    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads $TMPDIR again
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_on_a_full_disk_is_one_line_and_leaves_nothing(name, full_disk, trained_checkpoint,
                                                                other_filesystem_tmpdir, monkeypatch):
    if full_disk is None:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    out = full_disk / "out"
    line = main_error(COMMANDS[name](trained_checkpoint, out), other_filesystem_tmpdir, monkeypatch)
    assert line.startswith(f"error: cannot write {out}: No space left on device; free space")
    assert entries(full_disk) == ["filler", "previous"] and entries(full_disk / "previous") == ["last.ckpt"]
    assert not any(other_filesystem_tmpdir.iterdir())


@pytest.mark.parametrize("name, out", [
    ("quantize", "input/model.ckpt"), ("merge", "input/model.ckpt"), ("export", "input"), ("export", "."),
])
def test_an_output_that_is_or_holds_the_input_is_refused_and_the_input_kept(name, out, tmp_path, trained_checkpoint,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = trained_checkpoint.read_bytes()
    args = COMMANDS[name](trained_checkpoint.relative_to(tmp_path), out) + ["--overwrite", "true"]
    line = main_error(args, tmp_path, monkeypatch)
    assert f"--out {out} " in line and "the input input/model.ckpt" in line
    assert trained_checkpoint.read_bytes() == before and entries(trained_checkpoint.parent) == ["model.ckpt"]


def test_export_to_the_working_directory_or_a_read_only_one_is_one_line(tmp_path, trained_checkpoint, read_only_directory,
                                                                        monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    line = main_error(COMMANDS["export"](trained_checkpoint, ".") + ["--overwrite", "true"], tmp_path, monkeypatch)
    assert "--out . is the working directory" in line
    out = read_only_directory / "hf"
    line = main_error(COMMANDS["export"](trained_checkpoint, out), tmp_path, monkeypatch)
    assert line.startswith(f"error: cannot write {out}: ") and ("Read-only" in line or "Permission denied" in line)
    assert entries(read_only_directory) == [] and entries(work) == []


def test_a_failed_export_over_an_old_one_leaves_the_old_one(tmp_path, trained_checkpoint, monkeypatch):
    from picogpt_lightning.commands import export as export_command

    out = tmp_path / "hf"
    export_command.export_checkpoint(str(trained_checkpoint), str(out))
    old = {name: (out / name).read_bytes() for name in entries(out)}

    def fails_halfway(model, directory, tokenizer):
        (Path(directory) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_command, "save_pretrained", fails_halfway)
    with pytest.raises(checkpoints.WriteError, match=f"cannot write {out}: No space left on device"):
        export_command.export_checkpoint(str(trained_checkpoint), str(out), overwrite=True)
    assert {name: (out / name).read_bytes() for name in entries(out)} == old
    assert entries(tmp_path) == ["hf", "input"]  # no staging or set-aside directory left
    monkeypatch.undo()
    export_command.export_checkpoint(str(trained_checkpoint), str(out), overwrite=True)  # a whole new one replaces it
    assert entries(tmp_path) == ["hf", "input"] and entries(out) == sorted(old)
