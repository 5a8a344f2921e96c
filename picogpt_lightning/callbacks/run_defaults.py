"""The callbacks every command-line run adds to a built Trainer, decided from what the Trainer resolved."""

from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, RichProgressBar

from picogpt_lightning.callbacks.progress_bar import StepProgressBar


def add_run_callbacks(trainer) -> None:
    """The learning rate of every step in the logger's charts (it needs a logger), and StepProgressBar
    in place of Lightning's default rich bar (not a user's own bar), as for a model's
    `configure_callbacks`: a run's own LearningRateMonitor gives way, checkpoint callbacks stay last."""
    added, replaced = [], set()
    if trainer.loggers:
        added.append(LearningRateMonitor(logging_interval="step"))
        replaced.add(LearningRateMonitor)
    if type(trainer.progress_bar_callback) is RichProgressBar:
        added.append(StepProgressBar())  # no "Epoch 0/-2" on max_steps runs
        replaced.add(RichProgressBar)
    if not added:
        return
    kept = [callback for callback in trainer.callbacks if type(callback) not in replaced]
    checkpoints = [callback for callback in kept if isinstance(callback, Checkpoint)]
    trainer.callbacks = [callback for callback in kept if not isinstance(callback, Checkpoint)] + added + checkpoints
