"""A callback for the reliability tests' command-line runs: each step's loss, one JSON line each."""

import json
import time

from lightning.pytorch import Callback


class LossLog(Callback):
    """Appends {"step", "loss"} after each optimizer step; `pause` seconds each, so a signal lands mid-run."""

    def __init__(self, path: str, pause: float = 0.0):
        self.path = path
        self.pause = pause

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as log:
            log.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")
        time.sleep(self.pause)
