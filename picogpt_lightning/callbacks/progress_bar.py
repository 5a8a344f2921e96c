"""Lightning's rich progress bar, worded and counted for runs bounded by max_steps."""

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, worded and counted for runs bounded by max_steps.

    With max_steps set Lightning sets max_epochs to -1, and its bar reads "Epoch 0/-2"; this
    one reads "Epoch 0" then. Lightning's training bar counts the batches of the current epoch
    against what is left of the run, which reads "300/99" on a resumed run; with max_steps set
    this one counts the run's optimizer steps instead, global_step of max_steps, across epochs
    and resumes alike. The logger's version number (v_num) is left out of the metrics, and long
    names are shortened (val/rewards/accuracies: val/acc).
    """

    @property
    def total_train_batches(self):
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # a new epoch resets the bar to 0 ...
        if trainer.max_steps > 0 and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)  # ... the run has not

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # RichProgressBar moves its bar to batch_idx + 1, the batches of this epoch so far
        if trainer.max_steps > 0:
            batch_idx = trainer.global_step - 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # RichProgressBar has no public setting for this text: the protected method that builds it is overridden
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {short_name(name): value for name, value in metrics.items()}


# long metric names cut to a few characters, so the bar's metrics fit beside it in 80 columns
SHORT_NAMES = {"rewards/accuracies": "acc"}


def short_name(name: str) -> str:
    for long, short in SHORT_NAMES.items():
        if name.endswith(long):
            return name[: -len(long)] + short
    return name
