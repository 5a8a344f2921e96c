"""`last.ckpt`, always the newest state of the run."""

from datetime import timedelta
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint

from picogpt_lightning.errors import UserError


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` as the newest state of the run: every `every_minutes` of training, after each
    validation and when training ends. (Lightning's `save_last=True` rewrites it only beside another
    checkpoint, so with a monitored metric a finished run's `last.ckpt` could be far behind.)"""

    def __init__(self, dirpath: Optional[str] = None, every_minutes: float = 10.0):
        if every_minutes <= 0:
            raise UserError(f"last_checkpoint.every_minutes must be > 0, got {every_minutes}")
        super().__init__(
            dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
            train_time_interval=timedelta(minutes=every_minutes), enable_version_counter=False,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:  # beside the run's other checkpoints (best.ckpt) where their directory was chosen
            chosen = [cb.dirpath for cb in trainer.checkpoint_callbacks if cb is not self and cb.dirpath]
            self.dirpath = chosen[0] if chosen else None
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every_minutes
        if 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop:
            # the last step (max_steps, an interruption, early stopping), saved here rather than at on_train_end:
            # by then Lightning counts the epoch as finished, and a resumed run would skip the epoch's rest
            self.save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def save_now(self, trainer) -> None:
        # ModelCheckpoint has no public "save now". These are the protected methods its own hooks
        # call, so this save skips what they skip (sanity checks, runs other than fit, a step
        # already saved) and keeps last_model_path, the loggers' notice and the timer's state as they do.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
