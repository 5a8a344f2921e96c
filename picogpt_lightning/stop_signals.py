"""SIGTERM, SIGINT and SIGHUP as cluster schedulers expect them: a non-zero exit within seconds, in every phase.

SLURM and Kubernetes send SIGTERM, wait 30 s, then SIGKILL. While training runs, `InterruptCheckpoint`
stops at the next optimizer step or validation batch and saves (it calls `defer`). Everywhere else
(start-up, the sanity check, validate, test, predict, between pipeline stages) there is nothing
worth saving, so the signal ends the command at once, as `Interrupted`. Either way the exit status
is 128 + the signal: 143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP (a closed terminal, handled as
SIGTERM). A Ctrl+C after any signal exits 130 at once. A command that ends on a signal without
having saved says so in one line; whatever it was writing is removed as the signal unwinds it
(atomic.py), so nothing partial is left.

    with exits_on_signals():   # every command that runs: SystemExit(128 + signal) on a signal
        ...
"""

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, List, Optional

from picogpt_lightning.errors import first_line

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
STOPPING = tuple(s for s in SIGNALS if s != signal.SIGINT)  # passed on to DDP ranks (a Ctrl+C reaches them itself)


class Interrupted(BaseException):
    """Ends a command on a signal. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it;
    but not a KeyboardInterrupt, which Lightning turns into exit status 1."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    """What this process knows about signals: one instance, as signal handlers are process-wide."""

    def __init__(self):
        self.installed = False  # our handlers are in place (an `exits_on_signals` block or a training run)
        self.received: Optional[int] = None  # the first signal this process received
        self.stopping: Optional[int] = None  # the signal the command ends with: this rank's, or another rank's
        self.deferred = False  # training: InterruptCheckpoint stops at the next step or validation batch
        self.forward: List[Callable[[int], None]] = []  # pass SIGTERM on to the DDP ranks this process started
        self.announced = False  # the command has printed its own line about the signal (a training run's save)


state = _State()
_blocks = [0]  # `exits_on_signals` blocks running, one inside the other


def _handle(signum: int, frame) -> None:
    if state.received is not None:
        if signum == signal.SIGINT:  # the user insists: no save, no teardown
            exit_now(128 + signal.SIGINT)
        return  # a repeated SIGTERM: the stop under way goes on
    state.received = state.stopping = signum
    if signum in STOPPING:  # a Ctrl+C reaches the terminal's whole process group by itself
        for forward in state.forward:
            forward(signum)
    if not state.deferred:
        raise Interrupted(signum)


def launched_rank() -> bool:
    """A DDP rank other than the first (its stderr is the same terminal's)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("RANK", "LOCAL_RANK"))


def exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def take_over() -> None:
    """Puts our handlers back in place of the ones Lightning's Trainer sets when a loop starts (its SIGTERM
    handler exits 0, and under DDP broadcasts from inside the handler, which can hang the ranks)."""
    if state.installed and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _handle)


def defer(on: bool) -> None:
    """While on, a signal is only recorded: the training loop stops at its next boundary and saves."""
    state.deferred = on


def forward_to_launched_ranks(trainer) -> None:
    """SIGTERM on to the DDP ranks a Trainer's launcher starts as this process's children (as Lightning's own
    handler does): a scheduler that signals only its own child, as Kubernetes does, stops every rank."""
    kill = getattr(trainer.strategy.launcher, "kill", None)
    if callable(kill) and kill not in state.forward:
        state.forward.append(kill)


def stop(signum: int) -> None:
    """The command ends with `signum` once its current run returns (another rank's signal, seen in a reduce)."""
    state.stopping = state.stopping or signum


def install() -> Optional[dict]:
    """Our handlers in place of the current ones, which it returns (None: not the main thread, which alone may set them)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    state.__init__()
    state.installed = True
    for signum in SIGNALS:
        signal.signal(signum, _handle)
    return previous


def restore(previous: Optional[dict]) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)
    state.__init__()


@contextmanager
def exits_on_signals():
    """Runs the block with our handlers; a signal ends it with SystemExit(128 + the signal).

    Nested blocks (each pipeline stage's run inside the pipeline) pass `Interrupted` on to the outermost,
    which exits. A run that stopped at a boundary and returned normally ends the block the same way.
    """
    outermost = _blocks[0] == 0
    previous = install() if outermost else None
    _blocks[0] += 1
    try:
        yield
        if state.stopping is not None:
            raise Interrupted(state.stopping)
    except Interrupted as interrupted:
        if not outermost:
            raise
        if not state.announced and not launched_rank():  # one line per command: rank 0's
            name = signal.Signals(interrupted.signum).name
            print(f"{name}: stopped (exit {128 + interrupted.signum})", file=sys.stderr, flush=True)
        raise SystemExit(128 + interrupted.signum) from None
    except Exception as error:
        if not outermost or state.received is None:
            raise
        # the signal's consequence, such as a collective whose peer rank has stopped: the exit is the signal's
        name = signal.Signals(state.received).name
        print(f"{name}: stopped ({type(error).__name__}: {first_line(error)})", file=sys.stderr, flush=True)
        raise SystemExit(128 + state.received) from None
    finally:
        _blocks[0] -= 1
        if outermost:
            restore(previous)
