"""SIGTERM or SIGINT during training: save the step, say how to resume, exit 128 + the signal."""

import os
import signal
import sys
import threading
from typing import Any, Callable, Dict, Optional

from lightning.pytorch import Callback


class InterruptCheckpoint(Callback):
    """SIGTERM or SIGINT: finish the optimizer step, save `interrupted-step=N.ckpt`, print the command that resumes.

    Afterwards `exit_code` is 128 + the signal (143 for SIGTERM, 130 for SIGINT), which the command line
    exits with, as cluster schedulers expect of an interrupted job. Lightning's own SIGTERM handling
    stops without saving and exits 0; this replaces it while training runs. A second Ctrl+C stops at once.
    `resume_command`: the command line that resumes, given the checkpoint's path (the CLI sets it).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self.exit_code: Optional[int] = None
        self.saved_path: Optional[str] = None
        self.resume_command: Optional[Callable[[str], str]] = None
        self._previous_handlers: Dict[int, Any] = {}
        self._step_at_batch_start = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = self.exit_code = self.saved_path = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous_handlers = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # in the middle of gradient accumulation: a checkpoint here could not resume exactly
        stop = self.received is not None
        if trainer.world_size > 1:
            # every rank must stop at the same step: one small all-reduce per step, as Lightning's own SIGTERM
            # check under DDP; a single process needs none
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.save_and_stop(trainer)

    def save_and_stop(self, trainer) -> None:
        signum = self.received or signal.SIGTERM  # another rank received it
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = os.path.join(dirpath, f"interrupted-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path, self.exit_code = path, 128 + signum
        trainer.should_stop = True
        resume = self.resume_command(path) if self.resume_command else f"trainer.fit(..., ckpt_path={path!r})"
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            print(f"{name}: saved step {trainer.global_step} to {path}\nresume with: {resume}", file=sys.stderr, flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
