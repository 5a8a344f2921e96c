"""Swapping a model's nn.Linear layers for quantized ones (NF4, int8, int4), the same rules for every method."""

from typing import Callable, Iterable

from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant.bitnet import BitLinear, PackedBitLinear


def replace_linears(model: nn.Module, convert: Callable[[nn.Linear], nn.Module], method: str, skip: Iterable[str]) -> nn.Module:
    """Replaces every nn.Linear of `model` by `convert(layer)`, in place, and returns the model.

    A layer is left in full precision when its name, or its attribute name, is in `skip` (by default
    the lm_head, which a tied model shares with the embeddings); BitNet layers and ties are refused.
    """
    skip = set(skip)
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, (BitLinear, PackedBitLinear)):
                raise UserError(
                    f"{full_name} is a BitNet layer: a BitNet model has its own packed format (method 'bitnet'), not {method}"
                )
            if not isinstance(child, nn.Linear) or name in skip or full_name in skip:
                continue
            if id(child.weight) in shared:
                raise UserError(
                    f"{full_name} shares its weight with an embedding (tied weights); add {name!r} to skip so the "
                    "tie and the embedding stay in full precision"
                )
            setattr(parent, name, convert(child))
    return model
