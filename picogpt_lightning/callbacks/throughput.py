"""Lightning's ThroughputMonitor, timed only on logged steps, with MFU against dense 16-bit peaks."""

import time
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.plugins import BitsandbytesPrecision
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from picogpt_lightning.callbacks.log_steps import logs_at_step

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, FLOP/s, most specific
# name first. Lightning's table lacks the H200 and gives Hopper's sparse figure, twice what a dense
# matmul can reach, which would halve the MFU it reports.
DENSE_PEAK_FLOPS_16BIT = (("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12))


def dense_peak_flops(device_name: str, dtype) -> Optional[float]:
    """The dense bf16/fp16 peak of a GPU this table knows, else None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.lower()
    return next((peak for chip, peak in DENSE_PEAK_FLOPS_16BIT if chip in name), None)


def half_compute_dtype(trainer) -> Optional[torch.dtype]:
    """bfloat16 or float16 when the trainer's precision computes in it, else None.

    Read from the precision's public name ("bf16-mixed", "16-true", ...); a bitsandbytes plugin
    names its compute dtype itself.
    """
    plugin = trainer.precision_plugin
    if isinstance(plugin, BitsandbytesPrecision):
        return plugin.dtype if plugin.dtype in (torch.bfloat16, torch.float16) else None
    precision = str(trainer.precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else None


class PeakFlopsThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor, made cheap on a GPU, with MFU against the dense peaks above.

    Lightning's reads the clock after every batch, behind a `torch.cuda.synchronize()`: a host sync
    that drains the GPU's queue each step. This one reads it only on the steps whose metrics are
    logged (the other batches are counted, not timed) and not during validation, whose span is
    taken out of the training clock instead. The rolling window is then `window_size` logged steps.

    ThroughputMonitor offers no public hook for timing fewer batches: this subclass keeps its
    protected counters (`_samples`, `_batches`, `_lengths`, `_t0s`, `_throughputs`) up to date
    itself and extends its `_update`.
    """

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int],
        length_fn: Optional[Callable[[Any], int]] = None,
        window_size: int = 5,
        separator: str = "/",
        **kwargs,
    ):
        super().__init__(batch_size_fn, length_fn, window_size=window_size, separator=separator, **kwargs)
        self._untimed_batches = 0
        self._validation_start = None
        self._step_at_batch_start = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return
        peak = dense_peak_flops(torch.cuda.get_device_name(device), half_compute_dtype(trainer))
        if peak is not None:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = int(peak)

    def _synchronized_clock(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @rank_zero_only
    def on_train_batch_start(self, trainer, *args) -> None:
        self._step_at_batch_start = trainer.global_step

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        stepped = trainer.global_step != self._step_at_batch_start  # not a micro-batch of gradient accumulation
        if not (stepped and logs_at_step(trainer, trainer.global_step)):
            self._count_untimed(trainer, batch)  # the next logged step's clock reading covers its time
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def _count_untimed(self, trainer, batch) -> None:
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
        self._untimed_batches += 1

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        # Throughput takes the FLOPs done since its last update: this batch's and the untimed ones'
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is not None:
            pl_module.flops_per_batch = flops * (self._untimed_batches + 1)
        try:
            super()._update(trainer, pl_module, batch, iter_num)
        finally:
            if flops is not None:
                pl_module.flops_per_batch = flops
        self._untimed_batches = 0

    def _fitting(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING

    @rank_zero_only
    def on_validation_start(self, trainer, *args) -> None:
        if self._fitting(trainer):
            self._validation_start = self._synchronized_clock(trainer)
        else:
            super().on_validation_start(trainer, *args)

    @rank_zero_only
    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if not self._fitting(trainer):  # a `validate` run is timed batch by batch, as Lightning does
            super().on_validation_batch_end(trainer, *args, **kwargs)

    @rank_zero_only
    def on_validation_end(self, trainer, *args) -> None:
        if self._fitting(trainer) and self._validation_start is not None:
            self._t0s[RunningStage.TRAINING] += self._synchronized_clock(trainer) - self._validation_start
            self._validation_start = None
