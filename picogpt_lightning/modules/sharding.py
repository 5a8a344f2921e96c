"""FSDP for the recipes: FSDP2 units under ModelParallelStrategy, and gradient-norm clipping over shards."""

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor

from picogpt_lightning.errors import UserError


def check_data_parallel_mesh(mesh) -> None:
    """The model shards by FSDP only: a tensor-parallel dimension > 1 is refused with the setting to change."""
    if mesh["tensor_parallel"].size() > 1:
        raise UserError(
            f"ModelParallelStrategy has tensor_parallel_size {mesh['tensor_parallel'].size()}, "
            "but this model shards by FSDP only; set tensor_parallel_size: 1 and data_parallel_size to "
            "the number of devices (see configs/fsdp.yaml)"
        )


def shard_trainable_modules(module: nn.Module, mesh) -> None:
    """FSDP2: one unit per transformer block, then the rest of the trained model as the root unit.

    `module` is a recipe whose `model` is the trained PicoGPT. Other trainable parts (a
    distillation projection) get their own unit so their gradients are reduced across ranks
    too; a frozen teacher or reference stays whole on every rank (it has no gradients to
    reduce). Called again on a model already sharded, it changes nothing.
    """
    if isinstance(module.model.lm_head.weight, DTensor):
        return
    for block in module.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module.model, mesh=mesh)
    for child in module.children():
        if child is not module.model and any(param.requires_grad for param in child.parameters()):
            fully_shard(child, mesh=mesh)


def clip_grad_norm(module: nn.Module, wrapped: nn.Module, max_norm: float) -> None:
    """Clips the global gradient norm of `module`, which the strategy holds as `wrapped`.

    FSDP's root module clips its shards against the global norm itself; on one device, under
    DDP, and for FSDP2's DTensors (whose norm torch reduces over the shards) torch's own does.
    """
    if isinstance(wrapped, FullyShardedDataParallel):
        wrapped.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
