"""A scheduler's grace period: SIGTERM or SIGINT in every phase exits non-zero within seconds.

Real subprocesses, real signals. Each run prints `phase: ...` lines (PhaseMarks below, loaded by
the subprocess from this file) and pauses where the signal should land; the test waits for the
line, sends the signal, and checks the exit status, the time to the exit and what was saved.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
from lightning.pytorch import Callback

from picogpt_lightning import checkpoints
from test_reliability import write_config as reliability_config
from tiny_training import BLOCK_SIZE

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
GRACE_SECONDS = 10  # the bound from the signal to the exit, the save's own time aside

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")


class PhaseMarks(Callback):
    """Prints a `phase: ...` line to stderr where a run is, pausing there so a signal lands in that phase."""

    def __init__(self, startup_pause: float = 0.0, setup_pause: float = 0.0, train_pause: float = 0.0,
                 val_pause: float = 0.0):
        self.setup_pause, self.train_pause, self.val_pause = setup_pause, train_pause, val_pause
        if startup_pause:  # made with the command's other objects, before the Trainer exists
            self.mark("start-up")
            time.sleep(startup_pause)

    @staticmethod
    def mark(text: str) -> None:
        sys.stderr.write(f"phase: {text}\n")  # one write: the lines of two DDP ranks stay apart
        sys.stderr.flush()

    def setup(self, trainer, pl_module, stage):
        self.mark(f"setup rank {trainer.global_rank} pid {os.getpid()}")
        time.sleep(self.setup_pause)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mark(f"train step {trainer.global_step}")
        time.sleep(self.train_pause)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.mark(f"{'sanity' if trainer.sanity_checking else 'validation'} batch {batch_idx} step {trainer.global_step}")
        time.sleep(self.val_pause)


SMALLER_MODEL = {"config": {"block_size": BLOCK_SIZE, "n_layer": 1, "n_head": 2, "n_query_groups": 1, "n_embd": 16},
                 "warmup_steps": 2}


def write_config(tmp_path, corpus, data=None, **trainer) -> Path:
    """test_reliability's tiny recipe with a smaller model, validating every 5 steps."""
    return reliability_config(tmp_path, corpus, model=SMALLER_MODEL, data=data, **{"val_check_interval": 5, **trainer})


def marks(**pauses) -> List[str]:
    return ["--trainer.callbacks+=test_faults_signals.PhaseMarks"] + [
        f"--trainer.callbacks.{name}={value}" for name, value in pauses.items()
    ]


def environment(**extra):
    path = os.pathsep.join([str(REPO_ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PICOGPT_DEBUG": "", "OMP_NUM_THREADS": "1", **extra}


class Run:
    """A command in a subprocess whose stderr is read line by line, so a test can wait for a phase."""

    def __init__(self, args: List[str], cwd: Path, **env):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "picogpt_lightning", *args], cwd=cwd, env=environment(**env),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        self.lines: List[str] = []

    def wait_for(self, *patterns: str, timeout: float = 180) -> List[re.Match]:
        """Reads stderr until each pattern has matched a line, in any order; their matches."""
        found = {}
        deadline = time.time() + timeout
        while len(found) < len(patterns) and time.time() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break  # the process ended before the phase came
            self.lines.append(line.rstrip("\n"))
            found.update({p: m for p in patterns if p not in found and (m := re.search(p, line))})
        if len(found) < len(patterns):
            self.process.kill()
            pytest.fail(f"no line matching {set(patterns) - set(found)}; stderr:\n" + "\n".join(self.lines[-30:]))
        return [found[p] for p in patterns]

    def signal_and_wait(self, signum: int, pid: Optional[int] = None, timeout: float = 120):
        """Sends `signum` (to `pid`, another rank, if given); returns (exit status, seconds to the exit)."""
        start = time.monotonic()
        os.kill(pid or self.process.pid, signum)
        rest = self.process.communicate(timeout=timeout)[1]
        self.lines += rest.splitlines()
        return self.process.returncode, time.monotonic() - start

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def save_seconds(stderr: str) -> float:
    """The interruption's own saves (interrupted-step=N.ckpt and last.ckpt), as the run reports them."""
    return float(re.search(r"saved step \d+ to .* in ([\d.]+) s", stderr).group(1))


def resume_args(stderr: str) -> List[str]:
    line = [line for line in stderr.splitlines() if line.startswith("resume with: ")][-1]
    return shlex.split(line.removeprefix("resume with: "))[3:]  # after "python -m picogpt_lightning"


# ---- training: SIGTERM with a long validation set -----------------------------------------------


@pytest.mark.parametrize("phase", ["training", "validation"])
def test_sigterm_with_a_long_validation_exits_143_within_the_grace_period_and_resumes(corpus_path, tmp_path, phase):
    # 200 validation batches of 0.1 s each: a full validation alone takes 20 s, twice the grace period;
    # the signal lands in a step (before the validation at step 5) or in that validation
    config = write_config(tmp_path, corpus_path, data={"val_samples": 800}, max_steps=12, num_sanity_val_steps=0)
    run = Run(["fit", "--config", str(config), *marks(train_pause=0.3 if phase == "training" else 0.0, val_pause=0.1)],
              cwd=tmp_path)
    run.wait_for(r"phase: train step 3$" if phase == "training" else r"phase: validation batch 5 step 5$")
    status, seconds = run.signal_and_wait(signal.SIGTERM)
    assert status == 143, run.stderr
    assert seconds <= GRACE_SECONDS + save_seconds(run.stderr), run.stderr
    assert "phase: validation batch 10 " not in run.stderr  # no validation after the signal ran on
    step = int(re.search(r"SIGTERM: saved step (\d+) ", run.stderr).group(1))
    assert step in ((3, 4) if phase == "training" else (5,))  # the step under way, or the one before the validation
    saved = tmp_path / f"runs/tiny/version_0/checkpoints/interrupted-step={step}.ckpt"
    assert checkpoints.load(saved).global_step == step
    assert checkpoints.load(saved.parent / "last.ckpt").global_step == step
    assert not (saved.parent / "best.ckpt").exists()  # no val loss of a part of the validation set

    args = resume_args(run.stderr)
    assert args[-2:] == ["--ckpt_path", str(saved)]
    if phase == "training":
        return  # tests/test_reliability.py resumes from a step's save, loss for loss; here: from a validation's
    no_pauses = ["--trainer.callbacks.train_pause=0", "--trainer.callbacks.val_pause=0"]
    resumed = subprocess.run([sys.executable, "-m", "picogpt_lightning", *args, *no_pauses],
                             cwd=tmp_path, env=environment(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    steps = [int(s) for s in re.findall(r"phase: train step (\d+)", resumed.stderr)]
    assert steps == list(range(step + 1, 13))  # it continued from the saved step to the end


def test_sighup_during_training_saves_the_step_as_sigterm_does(corpus_path, tmp_path):
    # a closed terminal (or `kill -HUP`) would otherwise lose the steps since the last save
    config = write_config(tmp_path, corpus_path, limit_val_batches=0, max_steps=30)
    run = Run(["fit", "--config", str(config), *marks(train_pause=0.3)], cwd=tmp_path)
    run.wait_for(r"phase: train step 2$")
    status, _ = run.signal_and_wait(signal.SIGHUP)
    assert status == 129, run.stderr
    step = int(re.search(r"SIGHUP: saved step (\d+) ", run.stderr).group(1))
    assert checkpoints.load(tmp_path / f"runs/tiny/version_0/checkpoints/last.ckpt").global_step == step
    assert "stopped" not in run.stderr and "Traceback" not in run.stderr  # the save's line is the one line


# ---- every other phase: nothing to save, a non-zero exit at once --------------------------------


@pytest.mark.parametrize(
    "command, pauses, phase, signum",
    [
        ("fit", dict(startup_pause=60), r"phase: start-up$", signal.SIGTERM),  # before the Trainer exists
        ("fit", dict(val_pause=60), r"phase: sanity batch 0 ", signal.SIGTERM),
        ("validate", dict(val_pause=60), r"phase: validation batch 0 ", signal.SIGINT),
    ],
    ids=["start-up", "sanity-check", "validate"],
)
def test_a_signal_outside_training_exits_non_zero_at_once(corpus_path, tmp_path, command, pauses, phase, signum):
    config = write_config(tmp_path, corpus_path, data={"val_samples": 40})
    run = Run([command, "--config", str(config), *marks(**pauses)], cwd=tmp_path)
    run.wait_for(phase)
    status, seconds = run.signal_and_wait(signum)
    assert status == 128 + signum, run.stderr
    assert seconds <= GRACE_SECONDS, run.stderr  # the 60 s pause did not run out
    assert "Traceback" not in run.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # no step was trained: nothing to save


def test_sigterm_to_a_ddp_rank_during_setup_exits_143_and_stops_every_rank(corpus_path, tmp_path):
    # Lightning starts rank 1 as rank 0's child; Kubernetes signals only the container's first process
    config = write_config(tmp_path, corpus_path, max_steps=4, limit_val_batches=0, devices=2, strategy="ddp")
    run = Run(["fit", "--config", str(config), *marks(setup_pause=3)], cwd=tmp_path)
    run.wait_for(r"phase: setup rank 0 pid", r"phase: setup rank 1 pid")
    status, seconds = run.signal_and_wait(signal.SIGTERM)
    assert status == 143, run.stderr
    assert seconds <= GRACE_SECONDS, run.stderr  # rank 1 has ended too: the stderr it shares was closed
    assert "phase: train step" not in run.stderr and "Traceback" not in run.stderr


def test_a_second_sigint_exits_130_at_once(corpus_path, tmp_path):
    config = write_config(tmp_path, corpus_path, limit_val_batches=0)
    run = Run(["fit", "--config", str(config), *marks(train_pause=5)], cwd=tmp_path)
    run.wait_for(r"phase: train step 1$")
    os.kill(run.process.pid, signal.SIGINT)  # the run would save at the end of this pause ...
    time.sleep(0.5)
    status, seconds = run.signal_and_wait(signal.SIGINT)  # ... the second Ctrl+C exits before it
    assert status == 130, run.stderr
    assert "saved step" not in run.stderr and not list(tmp_path.rglob("interrupted-*.ckpt"))


# ---- between pipeline stages ------------------------------------------------------------------


def test_a_signal_between_pipeline_stages_exits_143(tmp_path, monkeypatch):
    """The pipeline's own stage loop, its stages' runs replaced: a real one trains three models."""
    from picogpt_lightning import lightning_cli
    from picogpt_lightning.commands import pipeline

    runs = []
    monkeypatch.setattr(lightning_cli, "run_lightning", lambda config: runs.append(config))
    stage_config = pipeline.stage_config

    def signalled_before_the_second_stage(stage, *args):
        if stage == "distill":
            os.kill(os.getpid(), signal.SIGTERM)  # the teacher's run has returned, the student's not begun
        return stage_config(stage, *args)

    monkeypatch.setattr(pipeline, "stage_config", signalled_before_the_second_stage)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit:
        pipeline.run_pipeline(out_dir=str(tmp_path / "pipeline"), teacher_steps=1, student_steps=1, progress_bar=False)
    assert exit.value.code == 143
    assert len(runs) == 1  # the teacher's; no stage started after the signal
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # given back
