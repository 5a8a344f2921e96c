"""The commands that write (quantize, merge, export, prepare) under signals, SIGKILL and a second writer.

Real subprocesses, real signals. PAUSING_PYTHON runs a command with the project's atomic writes
paused halfway (a file's temporary copy half written, a directory staged but not yet renamed),
printing `phase: writing` there, so a signal or a second writer lands mid-write.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.outputs import OUTPUT_MARKER
from picogpt_lightning.tokenizer import build_tokenizer
from test_faults_writes import main_error
from tiny_training import tiny_config

REPO_ROOT = Path(__file__).resolve().parent.parent

PAUSING_PYTHON = r"""
import os, sys, time
from picogpt_lightning import atomic
from picogpt_lightning.cli import main

def pause():
    sys.stderr.write("phase: writing\n")
    sys.stderr.flush()
    time.sleep(float(os.environ.get("PAUSE_SECONDS", "60")))

write = atomic.RecordingWriter.write
def paused_write(self, data):
    if not getattr(self, "paused", False):
        self.paused = True
        self.file.write(data[: len(data) // 2])  # half of the first piece on disk
        self.file.flush()
        pause()
    return write(self, data)

sync_tree = atomic.sync_tree
def paused_sync_tree(directory):
    pause()
    sync_tree(directory)

atomic.RecordingWriter.write, atomic.sync_tree = paused_write, paused_sync_tree
main(sys.argv[1:])
"""


@pytest.fixture
def workdir(tmp_path):
    """tmp_path with a small checkpoint (model.ckpt) and a folder of text (texts/) to read."""
    tokenizer = build_tokenizer("char", "to be or not to be")
    torch.manual_seed(0)
    checkpoints.save(tmp_path / "model.ckpt", PicoGPT(tiny_config(vocab_size=tokenizer.vocab_size, mlp="swiglu")), tokenizer)
    (tmp_path / "texts").mkdir()
    for number in range(10):  # documents enough for a val split
        (tmp_path / "texts" / f"{number}.txt").write_text("to be or not to be, that is the question\n" * 20)
    return tmp_path


COMMANDS = {
    "quantize": ["quantize", "--ckpt", "model.ckpt", "--method", "nf4", "--out", "out.ckpt"],
    "merge": ["merge", "--a", "model.ckpt", "--b", "model.ckpt", "--out", "out.ckpt"],
    "export": ["export", "--ckpt", "model.ckpt", "--out", "out"],
    "prepare": ["prepare", "--source", "texts", "--out", "out"],
}


def environment(**extra):
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PICOGPT_DEBUG": "", "OMP_NUM_THREADS": "1", **extra}


def start(args, cwd: Path, pause: float = 60):
    return subprocess.Popen([sys.executable, "-c", PAUSING_PYTHON, *args], cwd=cwd, env=environment(PAUSE_SECONDS=str(pause)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_writing(process, timeout: float = 120) -> None:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("phase: writing"):
            return
    process.kill()
    pytest.fail("the command never reached its write; stderr:\n" + "".join(lines))


def finish(process, timeout: float = 60):
    stderr = process.communicate(timeout=timeout)[1]
    return process.returncode, [line for line in stderr.splitlines() if line.strip()]


def run(args, cwd: Path):
    return subprocess.run([sys.executable, "-m", "picogpt_lightning", *args], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=180)


def names(directory: Path):
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("name, signum", [
    ("quantize", signal.SIGTERM), ("merge", signal.SIGINT), ("export", signal.SIGHUP), ("prepare", signal.SIGTERM),
])
def test_a_signal_mid_write_exits_128_plus_it_in_one_line_and_leaves_nothing(workdir, name, signum):
    before = set(names(workdir))
    process = start(COMMANDS[name], workdir)
    wait_for_writing(process)
    process.send_signal(signum)
    status, lines = finish(process)
    assert status == 128 + signum, lines
    assert lines == [f"{signal.Signals(signum).name}: stopped (exit {128 + signum})"]  # one line, no traceback
    assert set(names(workdir)) == before  # no output, no hidden temporary file, staging folder or lock


@pytest.mark.parametrize("name", ["quantize", "export"])
def test_what_a_sigkill_left_the_next_run_removes(workdir, name):
    before = set(names(workdir))
    process = start(COMMANDS[name], workdir)
    wait_for_writing(process)
    process.send_signal(signal.SIGKILL)
    finish(process)
    left = set(names(workdir)) - before
    assert left and all(entry.startswith(".") for entry in left)  # a killed process cannot clean up ...
    result = run(COMMANDS[name], workdir)
    assert result.returncode == 0, result.stderr
    out = COMMANDS[name][-1]
    assert set(names(workdir)) == before | {out}  # ... the next run of the command does
    if name == "export":
        assert (workdir / out / OUTPUT_MARKER).is_file()


def test_two_writers_of_one_output_one_is_refused(workdir):
    first = start(COMMANDS["merge"], workdir)
    wait_for_writing(first)
    second = run(COMMANDS["merge"], workdir)  # while the first is writing out.ckpt
    assert second.returncode == 1
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is being written by another process" in lines[0], lines
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 143
    assert not (workdir / "out.ckpt").exists() and not list(workdir.glob(".out.ckpt*"))


def test_sigint_while_generate_streams_is_one_line(workdir):
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "generate", "--ckpt", "model.ckpt", "--prompt", "to",
         "--max_new_tokens", "1000000"],
        cwd=workdir, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.read(20)  # text is streaming
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert [line for line in stderr.splitlines() if line.strip()] == ["SIGINT: stopped (exit 130)"]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_command_still_imports_is_one_line(workdir, signum, status):
    """Within the first second a command is still importing torch and the rest: no traceback, no silent death."""
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "generate", "--ckpt", "model.ckpt", "--prompt", "to"],
        cwd=workdir, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status
    lines = [line for line in stderr.splitlines() if line.strip()]
    # one line; interrupted inside an import, its parenthesis may name what the import was doing instead
    assert len(lines) == 1 and lines[0].startswith(f"{signal.Signals(signum).name}: stopped ("), lines


def test_generate_into_a_closed_pipe_stops_quietly(workdir):
    """`generate ... | head`: the reader leaves early; the writer stops without a traceback (141, as SIGPIPE would)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "picogpt_lightning", "generate", "--ckpt", "model.ckpt", "--prompt", "to",
         "--max_new_tokens", "1000000"],
        cwd=workdir, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.read(20)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr


# ---- --overwrite replaces only an earlier output of the same command -----------------------------


@pytest.mark.parametrize("name", ["quantize", "merge", "export"])
def test_overwrite_never_replaces_what_another_command_or_person_wrote(workdir, name, monkeypatch):
    monkeypatch.chdir(workdir)
    out = workdir / COMMANDS[name][-1]
    if name == "export":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_bytes((workdir / "model.ckpt").read_bytes())  # a checkpoint, but not this command's output
    line = main_error(COMMANDS[name] + ["--overwrite", "true"], workdir, monkeypatch)
    assert "--overwrite replaces only an earlier output of this command" in line, line
    assert (out / "notes.txt").read_text() == "mine" if name == "export" else out.read_bytes() == (workdir / "model.ckpt").read_bytes()


def test_overwrite_replaces_an_earlier_output_of_the_same_command(workdir, monkeypatch):
    from picogpt_lightning.cli import main

    monkeypatch.chdir(workdir)
    main(COMMANDS["export"])
    earlier = (workdir / "out" / "config.json").stat().st_mtime_ns
    main(COMMANDS["export"] + ["--overwrite", "true"])
    assert (workdir / "out" / "config.json").stat().st_mtime_ns != earlier and (workdir / "out" / OUTPUT_MARKER).is_file()
    assert not [name for name in names(workdir) if name.startswith(".")]
    # a file added to it since is someone's own: the folder is no longer only what export wrote
    (workdir / "out" / "my_notes.txt").write_text("mine")
    line = main_error(COMMANDS["export"] + ["--overwrite", "true"], workdir, monkeypatch)
    assert "--overwrite replaces only an earlier output of this command" in line, line
    assert (workdir / "out" / "my_notes.txt").read_text() == "mine"


def test_a_refused_write_leaves_no_folder_it_made(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    line = main_error(["quantize", "--ckpt", "missing.ckpt", "--method", "nf4", "--out", "new/deeper/out.ckpt"],
                      workdir, monkeypatch)
    assert "missing.ckpt" in line and not (workdir / "new").exists()
