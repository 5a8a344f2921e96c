"""A LoRA run inside a training module: the adapted policy, and checkpoints that hold its adapters only.

The base is the run's `init_from`, read when the module is built, so a resumed run and
`load_from_checkpoint` rebuild the same frozen base and restore only the adapters (and, on
resume, their optimizer state: the optimizer never sees anything else). A checkpoint names
its base by absolute path and SHA-256, so `PicoGPT.from_checkpoint` folds the adapters into
exactly the weights they were trained on (checkpoints.load), or says in one line why it cannot.
"""

import os
from typing import Dict, Optional, Tuple

from picogpt_lightning import checkpoints
from picogpt_lightning.lora import LoraSettings, add_adapters, is_adapter_key
from picogpt_lightning.model import PicoGPT, PicoGPTConfig


def adapted_model(
    start: checkpoints.Checkpoint, settings: LoraSettings, config: Optional[PicoGPTConfig] = None
) -> Tuple[PicoGPT, dict]:
    """The policy: `start`'s weights, frozen (in NF4 for QLoRA), with fresh adapters; and the
    checkpoint entry (checkpoints.LORA_KEY) that names the base."""
    checkpoints.require_unquantized(start, "LoRA's base (adapters train on full-precision or NF4-rounded weights)")
    model = add_adapters(PicoGPT.from_checkpoint(start, config), settings)  # config: dropout may differ
    entry = {
        "settings": settings.to_dict(),
        "base": os.path.abspath(start.path),
        "base_sha256": checkpoints.file_sha256(start.path),
    }
    return model, entry


def keep_adapters_only(state_dict: Dict[str, object], entry: Optional[dict], checkpoint: dict) -> None:
    """Drops the frozen base from a checkpoint's state dict (the model's keys that are no adapter)."""
    if entry is None:
        return
    for key in [key for key in state_dict if key.startswith(checkpoints.MODEL_PREFIX) and not is_adapter_key(key)]:
        del state_dict[key]
    checkpoint[checkpoints.LORA_KEY] = entry


def missing_base_keys(missing, entry: Optional[dict]):
    """The missing keys that matter: for a LoRA run, the base's own are expected to be missing."""
    if entry is None:
        return list(missing)
    return [key for key in missing if not key.startswith(checkpoints.MODEL_PREFIX) or is_adapter_key(key)]


def check_same_base(entry: Optional[dict], checkpoint: dict) -> None:
    """A resumed LoRA run must start from the base its adapters were trained on."""
    stored = checkpoint.get(checkpoints.LORA_KEY)
    if stored is None and entry is None:
        return
    if stored is None:
        raise checkpoints.CheckpointError(
            "this checkpoint holds a full fine-tune's weights, not LoRA adapters; resume it without model lora"
        )
    if entry is None:
        raise checkpoints.CheckpointError(
            f"this checkpoint holds LoRA adapters only; resume it with the lora settings {stored['settings']} "
            f"and init_from {stored['base']} it was started with"
        )
    if stored["base_sha256"] != entry["base_sha256"] or stored["settings"] != entry["settings"]:
        raise checkpoints.CheckpointError(
            f"this checkpoint's adapters were trained on {stored['base']} with lora {stored['settings']}, but the run "
            f"starts from {entry['base']} with lora {entry['settings']}; resume with the run's own init_from and lora"
        )
