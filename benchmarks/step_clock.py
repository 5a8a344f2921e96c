"""A callback for benchmarks: prints the wall clock when the first training step ends and each step's time.

    python -m picogpt_lightning fit ... --trainer.callbacks+=benchmarks.step_clock.StepClock

Lines: `first_step_end <unix seconds>`, then `step_ms <milliseconds>` per step (start to start,
data loading included, as nanoGPT's train.py times its iterations).
"""

import time

from lightning.pytorch.callbacks import Callback


class StepClock(Callback):
    def __init__(self):
        self.last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None:
            print(f"step_ms {(now - self.last) * 1000:.3f}", flush=True)
        self.last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            print(f"first_step_end {time.time():.4f}", flush=True)
