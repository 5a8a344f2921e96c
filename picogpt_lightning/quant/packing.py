"""Packing a model's linear layers as a quantization entry describes, the same way when packing and loading.

The entry is what a packed file stores beside its weights (see picogpt_lightning/checkpoints.py):
{"method": "nf4", "block_size", "double_quant", "skip"}, {"method": "int8", "skip"},
{"method": "int4", "group_size", "skip"} or {"method": "bitnet"}.
"""

from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant.bitnet import pack_bitnet
from picogpt_lightning.quant.int_weights import quantize_int4, quantize_int8
from picogpt_lightning.quant.nf4 import quantize_nf4

QUANTIZATION_METHODS = ("nf4", "int8", "int4", "bitnet")


def build_packed_layers(model: nn.Module, quantization: dict, source: str = "model") -> None:
    """Packs the model's linear layers as `quantization` describes, in place.

    Quantizing packs trained weights; loading a packed file packs a freshly built model's
    initial weights only to get layers of the right shapes, whose values the file then replaces.
    `source` names the file in errors.
    """
    method = quantization.get("method")
    if method in ("nf4", "int8", "int4") and model.config.linear != "linear":
        raise UserError(f"{source} holds {method} weights but its config has linear={model.config.linear!r}")
    if method == "nf4":
        quantize_nf4(
            model, block_size=int(quantization["block_size"]), double_quant=bool(quantization["double_quant"]),
            skip=tuple(quantization["skip"]),
        )
    elif method == "int8":
        quantize_int8(model, skip=tuple(quantization["skip"]))
    elif method == "int4":
        quantize_int4(model, group_size=int(quantization["group_size"]), skip=tuple(quantization["skip"]))
    elif method == "bitnet":
        if model.config.linear == "linear":
            raise UserError(f"{source} holds packed BitNet weights but its config has linear='linear'")
        pack_bitnet(model)
    else:
        raise UserError(
            f"{source} has quantization method {method!r}, which this version cannot read; known: {QUANTIZATION_METHODS}"
        )
