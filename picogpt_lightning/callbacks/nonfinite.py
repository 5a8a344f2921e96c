"""Stop at the first non-finite loss; never write a checkpoint of a diverged model."""

import os
from typing import Optional

import torch
from lightning.pytorch import Callback

from picogpt_lightning.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class NonFiniteLossCheck(Callback):
    """Stops at the first non-finite training loss and never lets a checkpoint with non-finite weights be written.

    Reading the loss on the host each step would make the CPU wait for the GPU every step. Instead the
    step of the first non-finite loss is kept in a device tensor, updated each step without a sync, and
    read every `check_every_n_steps` steps, at the end, and before every checkpoint is written (where the
    weights are checked too): one sync per check, and no checkpoint can hold a diverged model.
    """

    def __init__(self, check_every_n_steps: int = 50):
        if check_every_n_steps < 1:
            raise UserError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.first_bad_step: Optional[torch.Tensor] = None  # -1 while every loss has been finite

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_bad_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = trainer.global_step  # the steps done, this batch's included when it stepped
        newly_bad = ~torch.isfinite(loss.detach()).all() & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        if step % self.check_every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer, pl_module, weights_too=True)  # raising here stops the file from being written

    def check(self, trainer, pl_module, weights_too: bool = False) -> None:
        bad_step = int(self.first_bad_step) if self.first_bad_step is not None else -1
        params = [p for p in pl_module.parameters() if p.numel()] if weights_too else []
        bad_weights = bool(params) and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        bad = trainer.strategy.reduce_boolean_decision(bad_step >= 0 or bad_weights, all=False)
        if not bad:
            return
        where = f"at step {bad_step}" if bad_step >= 0 else f"by step {trainer.global_step}"
        last_good = newest_checkpoint(trainer)
        raise TrainingDiverged(
            f"the training loss became non-finite (NaN or inf) {where}; stopped without saving. Last good checkpoint: "
            f"{last_good or 'none'}. Lower learning_rate or set gradient_clip_val, and resume or restart"
        )


def newest_checkpoint(trainer) -> Optional[str]:
    """The most recently written checkpoint file of this run's ModelCheckpoint callbacks."""
    paths = {path for cb in trainer.checkpoint_callbacks for path in (cb.best_model_path, cb.last_model_path)}
    paths = [path for path in paths if path and os.path.isfile(path)]
    return max(paths, key=os.path.getmtime) if paths else None
