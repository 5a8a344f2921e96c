"""The callbacks every command-line run adds to a built Trainer, decided from what the Trainer resolved,
and the output no user can act on, left out of every run."""

import logging
import warnings

from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, RichModelSummary, RichProgressBar

from picogpt_lightning.callbacks.model_summary import ParameterSummary
from picogpt_lightning.callbacks.progress_bar import StepProgressBar

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"  # Lightning's advertisement, logged by every Trainer


def add_run_callbacks(trainer) -> None:
    """The learning rate of every step in the logger's charts (it needs a logger), StepProgressBar
    in place of Lightning's default rich bar (not a user's own bar) and ParameterSummary in place of
    its rich model summary, as for a model's `configure_callbacks`: a run's own LearningRateMonitor
    gives way, checkpoint callbacks stay last."""
    added, replaced = [], set()
    if trainer.loggers:
        added.append(LearningRateMonitor(logging_interval="step"))
        replaced.add(LearningRateMonitor)
    if type(trainer.progress_bar_callback) is RichProgressBar:
        added.append(StepProgressBar())  # no "Epoch 0/-2" on max_steps runs
        replaced.add(RichProgressBar)
    for callback in trainer.callbacks:
        if type(callback) is RichModelSummary:  # no "Total FLOPs: 0"; its depth and options kept
            summary = ParameterSummary()
            summary.__dict__.update(vars(callback))
            added.append(summary)
            replaced.add(RichModelSummary)
    if not added:
        return
    kept = [callback for callback in trainer.callbacks if type(callback) not in replaced]
    checkpoints = [callback for callback in kept if isinstance(callback, Checkpoint)]
    trainer.callbacks = [callback for callback in kept if not isinstance(callback, Checkpoint)] + added + checkpoints


def hide_unactionable_output() -> None:
    """Warnings no user can act on: Lightning cannot see that the data module restores the train loader's
    position (see its state_dict), a frozen teacher or reference model is in eval mode on purpose, and
    recent torch deprecates a check inside Lightning; and Lightning's litlogger tip."""
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, NoLitLoggerTip) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(NoLitLoggerTip())


class NoLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LITLOGGER_TIP)
