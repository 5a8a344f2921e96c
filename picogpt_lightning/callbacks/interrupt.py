"""SIGTERM, SIGINT or SIGHUP during training: save the step, say how to resume, exit 128 + the signal."""

import os
import signal
import sys
import time
from typing import Callable, Optional

from lightning.pytorch import Callback

from picogpt_lightning import stop_signals
from picogpt_lightning.callbacks.last_checkpoint import LastCheckpoint
from picogpt_lightning.stop_signals import Interrupted


class InterruptCheckpoint(Callback):
    """SIGTERM or SIGINT: finish the optimizer step or validation batch, save `interrupted-step=N.ckpt`
    (and `last.ckpt`), print the command that resumes, and end the run, starting no validation.

    The run ends with `stop_signals.Interrupted`, which `run_lightning` turns into the exit status
    128 + the signal (143 for SIGTERM, 130 for SIGINT), as cluster schedulers expect of an interrupted
    job; from the signal to the exit takes one step or validation batch plus the save. Outside the
    training loop (start-up, the sanity check, validate, test, predict) a signal ends the command at
    once (stop_signals.py). A second Ctrl+C stops at once. Lightning's own SIGTERM handling exits 0;
    this replaces it whenever one of the Trainer's loops starts.
    `resume_command`: the command line that resumes, given the checkpoint's path (the CLI sets it).
    """

    def __init__(self):
        self.exit_code: Optional[int] = None
        self.saved_path: Optional[str] = None
        self.resume_command: Optional[Callable[[str], str]] = None
        self._own_handlers: Optional[dict] = None  # installed here: a Trainer used outside run_lightning
        self._step_at_batch_start = 0

    # ---- whose handlers: ours, from the start of every loop on ---------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.exit_code = self.saved_path = None
        stop_signals.forward_to_launched_ranks(trainer)  # run_lightning has; a Trainer of the user's has not

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        stop_signals.take_over()

    def on_test_start(self, trainer, pl_module) -> None:
        stop_signals.take_over()

    def on_predict_start(self, trainer, pl_module) -> None:
        stop_signals.take_over()

    def on_train_start(self, trainer, pl_module) -> None:
        if not stop_signals.state.installed:
            self._own_handlers = stop_signals.install()
        stop_signals.take_over()
        stop_signals.defer(True)  # from here a signal waits for the step or validation batch under way

    def on_train_end(self, trainer, pl_module) -> None:
        stop_signals.defer(False)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        stop_signals.defer(False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        stop_signals.defer(False)
        if self._own_handlers is not None:
            stop_signals.restore(self._own_handlers)
            self._own_handlers = None

    # ---- where training may stop: after an optimizer step, after a validation batch -----------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # in the middle of gradient accumulation: a checkpoint here could not resume exactly
        if self.stop_requested(trainer):
            self.save(trainer)
            trainer.should_stop = True  # Lightning then validates before it stops, which on_validation_start refuses

    def on_validation_start(self, trainer, pl_module) -> None:
        stop_signals.take_over()
        if self.saved_path is not None and not trainer.sanity_checking:
            raise Interrupted(self.exit_code - 128)  # the step is saved: no validation after it

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not stop_signals.state.deferred or trainer.sanity_checking:
            return  # outside training a signal has ended the command already
        if self.stop_requested(trainer):
            self.save(trainer)
            raise Interrupted(self.exit_code - 128)  # ends the loop: no metrics of a part of the set

    def stop_requested(self, trainer) -> bool:
        stop = stop_signals.state.received is not None
        if trainer.world_size > 1:
            # every rank must stop at the same step: one small all-reduce per step, as Lightning's own SIGTERM
            # check under DDP; a single process needs none
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    def save(self, trainer) -> None:
        """`interrupted-step=N.ckpt` and `last.ckpt`; the message says how long they took (a share of the grace period)."""
        signum = stop_signals.state.received or signal.SIGTERM  # another rank received it
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = os.path.join(dirpath, f"interrupted-step={trainer.global_step}.ckpt")
        start = time.monotonic()
        trainer.save_checkpoint(path)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LastCheckpoint):
                callback.save_now(trainer)  # before Lightning's own hooks: they may never run after this step
        seconds = time.monotonic() - start
        self.saved_path, self.exit_code = path, 128 + signum
        stop_signals.state.announced = True  # the line below says what happened
        stop_signals.stop(signum)  # a run that returns normally from here still exits 128 + signum
        resume = self.resume_command(path) if self.resume_command else f"trainer.fit(..., ckpt_path={path!r})"
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            print(f"{name}: saved step {trainer.global_step} to {path} in {seconds:.2f} s\nresume with: {resume}",
                  file=sys.stderr, flush=True)
