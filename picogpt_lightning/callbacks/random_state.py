"""The random generators' states, saved in checkpoints and restored on resume."""

import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from lightning.pytorch import Callback


class RandomStateCheckpoint(Callback):
    """Stores the random generators' states (torch, CUDA, numpy, Python) in checkpoints and restores them
    when training resumes, so dropout and NEFTune noise continue as in an uninterrupted run (Lightning
    restores model, optimizer and loops, not these)."""

    def __init__(self):
        self.states_to_restore: Optional[dict] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"rng_states": collect_random_states()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.states_to_restore = state_dict.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        # the last moment before the first step: nothing draws from the generators after it
        if self.states_to_restore is not None:
            restore_random_states(self.states_to_restore)
            self.states_to_restore = None


# the keys and layout of Lightning's own seed utilities, so checkpoints written before load the same
def collect_random_states() -> Dict[str, Any]:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's key array as a tensor, so checkpoints load with torch.load(weights_only=True)
        "numpy": (name, torch.from_numpy(keys.astype("int64")), position, has_gauss, gauss),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_states(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states:
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "numpy" in states:
        name, keys, position, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, gauss))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
