"""AdamW as every recipe trains with it: decay groups, the fused kernel where it is safe, warmup + cosine.

With `optimizer: muon` this AdamW trains what Muon does not (modules/muon.py), under the same schedule.
"""

import inspect
import math
from typing import List, Optional, Sequence

import lightning as L
import torch
from torch import nn

FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu")


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine from 1 down to min_ratio, then flat."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def matrix_parameter_ids(module: nn.Module) -> set:
    """ids of the weights of linear and embedding layers: the parameters that get weight decay.

    Chosen by layer type, not by `param.dim() >= 2`, because FSDP flattens each shard to 1-D.
    """
    layers = (nn.Linear, nn.Embedding)
    return {id(layer.weight) for layer in module.modules() if isinstance(layer, layers)}


def adamw_groups(module: nn.Module, weight_decay: float) -> List[dict]:
    """The trainable parameters in two groups: matrices (linear, embedding) decay, gains and biases
    do not (nanoGPT's rule). Frozen models (teachers, references) are left out; the names label
    the groups' learning rates in the logs (LearningRateMonitor)."""
    matrices = matrix_parameter_ids(module)
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if id(param) in matrices else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "weight_decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_weight_decay"},
    ]


def fused_option(params: Sequence[torch.Tensor]) -> dict:
    """fused=True where torch has a fused AdamW kernel for every one of these parameters.

    The kernel needs floating-point tensors on one supported device type. Sharded parameters
    qualify too: FSDP's flat views are plain tensors and a DTensor reports its local device.
    """
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters or not params:
        return {}
    device_types = {param.device.type for param in params}
    supported = len(device_types) == 1 and device_types <= set(FUSED_ADAMW_DEVICES)
    return {"fused": True} if supported and all(param.is_floating_point() for param in params) else {}


def fused_adamw_can_clip(trainer: Optional[L.Trainer]) -> bool:
    """False only where gradients are clipped while fp16's loss scaler still holds them scaled.

    A fused step unscales inside itself, after any clipping, so clipping would see scaled
    gradients; there AdamW runs its foreach kernel, nearly as fast. fp32 and bf16 have no
    scaler, and `PicoGPTModule.configure_gradient_clipping` clips before the fused step.
    """
    if trainer is None or not trainer.gradient_clip_val:
        return True
    return not has_loss_scaler(trainer)


def has_loss_scaler(trainer: Optional[L.Trainer]) -> bool:
    """True under fp16 mixed precision, whose gradients stay scaled until the optimizer step."""
    return trainer is not None and trainer.scaler is not None


def adamw(groups: List[dict], lr: float, betas, trainer: Optional[L.Trainer]) -> torch.optim.AdamW:
    """AdamW over `groups`, with the fused kernel wherever it is exact under `trainer`'s precision."""
    params = [param for group in groups for param in group["params"]]
    fused = fused_option(params) if fused_adamw_can_clip(trainer) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


def warmup_cosine_schedule(optimizer, warmup_steps: int, decay_steps: int, min_ratio: float):
    """warmup_cosine as a per-step LambdaLR."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, decay_steps, min_ratio)
    )
