"""Lightning callbacks this project needs and Lightning lacks, one per file."""

from picogpt_lightning.callbacks.interrupt import InterruptCheckpoint
from picogpt_lightning.callbacks.last_checkpoint import LastCheckpoint
from picogpt_lightning.callbacks.log_steps import logs_at_step
from picogpt_lightning.callbacks.model_summary import ParameterSummary
from picogpt_lightning.callbacks.nonfinite import NonFiniteLossCheck, TrainingDiverged, newest_checkpoint
from picogpt_lightning.callbacks.progress_bar import StepProgressBar
from picogpt_lightning.callbacks.random_state import RandomStateCheckpoint
from picogpt_lightning.callbacks.run_defaults import add_run_callbacks, hide_unactionable_output
from picogpt_lightning.callbacks.sample_generation import SAMPLING, SampleGenerationCallback
from picogpt_lightning.callbacks.throughput import DENSE_PEAK_FLOPS_16BIT, PeakFlopsThroughputMonitor, dense_peak_flops

__all__ = [
    "DENSE_PEAK_FLOPS_16BIT",
    "InterruptCheckpoint",
    "LastCheckpoint",
    "NonFiniteLossCheck",
    "ParameterSummary",
    "PeakFlopsThroughputMonitor",
    "RandomStateCheckpoint",
    "SAMPLING",
    "SampleGenerationCallback",
    "StepProgressBar",
    "TrainingDiverged",
    "add_run_callbacks",
    "dense_peak_flops",
    "hide_unactionable_output",
    "logs_at_step",
    "newest_checkpoint",
]
