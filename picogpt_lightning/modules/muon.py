"""Muon for the transformer blocks' matrices, AdamW for everything else, as the one optimizer Lightning steps.

`optimizer: muon` on any training module (PicoGPTModule's argument) trains the 2-D weights of
the blocks' linear layers (attention qkv and proj, the MLP's matrices) with torch.optim.Muon:
momentum, orthogonalised by a Newton-Schulz iteration, then a step of `muon_lr`. Embeddings,
norms, lm_head (tied to the embedding by default) and any other trainable part (a distillation
projection) keep AdamW at `learning_rate`, in its usual decay groups. Under LoRA the blocks'
trainable matrices are the adapters' A and B, and Muon trains those. The warmup + cosine
schedule scales every group by the same factor, so `min_lr / learning_rate` sets both floors.

Attention's fused qkv weight is three matrices, q's, k's and v's, and Muon orthogonalises each
on its own, as it would unfused ones (Keller Jordan's advice; modded-nanogpt's shape).

The step is torch.optim.Muon's, with two changes: the row blocks above, and the Newton-Schulz
iteration runs in float32 off CUDA. torch runs it in bfloat16, fast on GPUs but 20-30x slower
than float32 on CPUs without bfloat16 matrix units (for pretrain_cpu's 20 matrices 1.1 s a step,
against 0.05 s in float32, beside a 0.25 s step). On CUDA a matrix without row blocks takes
torch's step exactly. Muon needs each matrix whole: FSDP's shards are refused, with the setting
to change.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from picogpt_lightning.errors import UserError
from picogpt_lightning.model.attention import CausalSelfAttention
from picogpt_lightning.modules.optim import adamw, adamw_groups

OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn


@dataclasses.dataclass(frozen=True)
class MuonOptions:
    """Muon's own settings, checked where a module takes them. Unused when the optimizer is AdamW."""

    lr: float = 0.02
    momentum: float = 0.95
    weight_decay: float = 0.0
    adjust_lr: str = "original"

    def __post_init__(self):
        if not self.lr > 0:
            raise UserError(f"muon_lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"muon_momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise UserError(f"muon_weight_decay must be >= 0, got {self.weight_decay}")
        if self.adjust_lr not in MUON_ADJUST_LR:
            raise UserError(f"muon_adjust_lr must be one of {MUON_ADJUST_LR}, got {self.adjust_lr!r}")


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 (torch.optim.Muon's choice) where matmuls in it are fast, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(matrix: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz iteration (Keller Jordan's quintic), op for op, in `dtype`."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(dtype).T if tall else matrix.to(dtype)
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1; out of place, as `to` may return `matrix` itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr: Optional[str], shape) -> float:
    """torch.optim.Muon's per-matrix learning rate: Keller Jordan's ("original") or Moonshot's ("match_rms_adamw")."""
    rows, cols = shape[:2]
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its arguments, checks, groups and state), stepping with the Newton-Schulz
    iteration in `ns_dtype`, or in newton_schulz_dtype(the parameter's device) when None.

    `row_blocks` maps a parameter to the row counts of the matrices stacked in it (a fused qkv
    weight: q's rows, k's, v's); each block is orthogonalised and scaled as a matrix of its own.
    """

    def __init__(self, params, ns_dtype: Optional[torch.dtype] = None,
                 row_blocks: Optional[Dict[nn.Parameter, Sequence[int]]] = None, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.row_blocks = dict(row_blocks or {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        grad, state = param.grad, self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        dtype = self.ns_dtype or newton_schulz_dtype(param.device)
        lr = float(group["lr"])
        param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        rows = self.row_blocks.get(param, [param.size(0)])
        for block, block_update in zip(param.split(rows), update.split(rows)):  # views: the steps land in param
            block_update = orthogonalize(block_update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
            block.add_(block_update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], block.shape))


def check_optimizer_name(name: str) -> str:
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}; set model optimizer: adamw or muon")
    return name


def muon_parameters(blocks: nn.Module) -> List[nn.Parameter]:
    """The trainable weights of the blocks' linear layers (BitLinear included): Muon's matrices."""
    return [
        layer.weight for layer in blocks.modules()
        if isinstance(layer, nn.Linear) and layer.weight.requires_grad and layer.weight.ndim == 2
    ]


def qkv_row_blocks(blocks: nn.Module) -> Dict[nn.Parameter, List[int]]:
    """Each attention layer's trainable fused qkv weight -> the row counts of its q, k and v."""
    row_blocks = {}
    for attention in blocks.modules():
        if isinstance(attention, CausalSelfAttention) and isinstance(attention.qkv, nn.Linear):
            if attention.qkv.weight.requires_grad:  # a frozen weight takes no step (under LoRA qkv is peft's layer)
                queries, keys = attention.n_head * attention.head_size, attention.n_query_groups * attention.head_size
                row_blocks[attention.qkv.weight] = [queries, keys, keys]
    return row_blocks


def check_whole_matrices(module: nn.Module, trainer: Optional[L.Trainer]) -> None:
    """Muon orthogonalises each matrix as a whole, which FSDP's shards (DTensors, flat views) are not."""
    sharded = trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
    if sharded or any(isinstance(param, DTensor) for param in module.parameters()):
        raise UserError(
            "optimizer 'muon' needs whole weight matrices, but FSDP shards them; "
            "set model optimizer: adamw to train with FSDP, or train muon without FSDP (DDP or one device)"
        )


def muon_with_adamw(
    module: nn.Module, blocks: nn.Module, options: MuonOptions, lr: float, weight_decay: float, betas,
    trainer: Optional[L.Trainer],
) -> "MuonWithAdamW":
    """Muon over `blocks`' matrices, AdamW (as `adamw` builds it) over the rest of `module`'s trainable parameters."""
    check_whole_matrices(module, trainer)
    matrices = muon_parameters(blocks)
    muon = Muon(
        [{"params": matrices, "name": "muon"}], lr=options.lr, weight_decay=options.weight_decay,
        momentum=options.momentum, nesterov=True, adjust_lr_fn=options.adjust_lr, row_blocks=qkv_row_blocks(blocks),
    )
    taken = {id(param) for param in matrices}
    groups = adamw_groups(module, weight_decay)
    for group in groups:
        group["params"] = [param for param in group["params"] if id(param) not in taken]
    return MuonWithAdamW(muon, adamw(groups, lr, betas, trainer))


class MuonWithAdamW(torch.optim.Optimizer):
    """Two optimizers stepped as one: Muon and AdamW, each over its own parameters.

    A pure dispatcher: each step runs the closure once, then Muon's step and AdamW's, exactly as
    if each were used alone. `param_groups` holds both optimizers' own group dicts (the same
    objects, Muon's first), so the learning-rate schedule, LearningRateMonitor, gradient
    clipping and the gradient scaling in PicoGPTModule.on_before_optimizer_step reach every
    group; `state` reads both states; `state_dict` holds both, and loading it restores both.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})  # also checks they share nothing
        self.state = StateView(muon, adamw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading gives each optimizer new group dicts; the list is refilled in place because
        # Lightning's LightningOptimizer keeps the very list object it found at the start
        self.param_groups[:] = self.muon.param_groups + self.adamw.param_groups


class StateView(Mapping):
    """The optimizers' states read as one mapping, parameter -> state, always their current ones.

    Read-only, and a lookup never adds an entry (each optimizer's own state is a defaultdict).
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def __getitem__(self, param):
        for optimizer in self.optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self):
        return (param for optimizer in self.optimizers for param in optimizer.state)

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)
