"""`python -m picogpt_lightning quantize`: a full-precision checkpoint in, a packed quantized file out.

The file format itself (what the packed entry holds, how loading rebuilds packed layers)
lives in picogpt_lightning/checkpoints.py.
"""

import os
from typing import Literal

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.outputs import writing_output
from picogpt_lightning.errors import UserError
from picogpt_lightning.quant import QUANTIZATION_METHODS, build_packed_layers
from picogpt_lightning.quant.int_weights import INT4_DEFAULT_GROUP_SIZE
from picogpt_lightning.quant.kernels import INT4_GROUP_SIZES


def quantize_checkpoint(
    source, out, method: str, block_size: int = 64, double_quant: bool = True, overwrite: bool = False,
    group_size: int = INT4_DEFAULT_GROUP_SIZE,
) -> dict:
    """Reads a full-precision checkpoint, packs its linear layers and writes `out`; returns the quantization entry.

    "nf4", "int8", "int4": every linear layer inside the blocks in NF4, int8 per output channel or int4 in
    groups of `group_size` inputs (the lm_head, tied to the embeddings, stays full precision). "bitnet": a
    model trained with linear="bitnet1.58" or "bitnet1", its weights as 2-bit or 1-bit codes plus one scale
    per tensor, computing what the training model computes (up to the int8 kernel's bfloat16 sums).
    """
    if method not in QUANTIZATION_METHODS:
        raise UserError(f"quantization method must be one of {QUANTIZATION_METHODS}, got {method!r}")
    quantization = quantization_entry(method, block_size, double_quant, group_size)
    source_path = source.path if isinstance(source, checkpoints.Checkpoint) else source
    packed_file = lambda path: checkpoints.holds_entry(path, checkpoints.QUANTIZATION_KEY)  # noqa: E731
    with writing_output(out, overwrite, inputs=[source_path], written_here=packed_file):
        write_quantized(source, out, method, quantization)
    return quantization


def write_quantized(source, out, method: str, quantization: dict) -> None:
    checkpoint = checkpoints.load(source)
    checkpoints.require_unquantized(checkpoint, "quantization again")
    config = checkpoint.resolve_config()
    if method == "bitnet" and config.linear == "linear":
        raise checkpoints.CheckpointError(
            f"{checkpoint.path} is a full-precision model (linear='linear'), not BitNet; use --method nf4, int8 or int4, "
            "or train with linear='bitnet1.58' or 'bitnet1' (configs/bitnet.yaml) to pack it as BitNet"
        )
    if method != "bitnet" and config.linear != "linear":
        raise checkpoints.CheckpointError(
            f"{checkpoint.path} is a BitNet model (linear={config.linear!r}); pack it with --method bitnet"
        )
    model = PicoGPT.from_checkpoint(checkpoint).eval()
    build_packed_layers(model, quantization, checkpoint.path)
    extra = {"global_step": checkpoint.global_step}  # how long the source model trained, for the record
    if checkpoint.tokenizer_dict is not None:
        extra[checkpoints.TOKENIZER_KEY] = checkpoint.tokenizer_dict
    checkpoints.save_quantized(out, model, quantization, **extra)


def quantization_entry(method: str, block_size: int, double_quant: bool, group_size: int) -> dict:
    """What the packed file records about its layers (picogpt_lightning/quant/packing.py reads it back)."""
    if method == "nf4":
        return {"method": "nf4", "block_size": block_size, "double_quant": double_quant, "skip": ["lm_head"]}
    if method == "int8":
        return {"method": "int8", "skip": ["lm_head"]}
    if method == "int4":
        if group_size not in INT4_GROUP_SIZES:
            raise UserError(f"--group_size must be one of {INT4_GROUP_SIZES} (inputs per int4 scale), got {group_size!r}")
        return {"method": "int4", "group_size": group_size, "skip": ["lm_head"]}
    return {"method": "bitnet"}


def quantize(
    ckpt: str,
    method: Literal["nf4", "int8", "int4", "bitnet"],
    out: str,
    block_size: int = 64,
    double_quant: bool = True,
    overwrite: bool = False,
    group_size: int = INT4_DEFAULT_GROUP_SIZE,
) -> None:
    """Write a checkpoint with packed quantized weights (NF4, int8, int4 or BitNet), which generate and PicoGPT.from_checkpoint load.

    Args:
        ckpt: a full-precision checkpoint written by training (model config and tokenizer inside).
        method: "nf4": 4-bit NormalFloat weights for any model trained with linear="linear"; "int8": int8 weights, one scale per output channel; "int4": int4 weights, a scale and zero point per group of inputs; "bitnet": a model trained with linear="bitnet1.58" (2 bits per weight) or "bitnet1" (1 bit), plus one scale per tensor.
        out: the file to write.
        block_size: NF4 only: weights per absmax constant.
        double_quant: NF4 only: store the absmax constants in 8 bits as well (QLoRA's double quantization).
        overwrite: replace out if it is an earlier packed file (never another kind of file).
        group_size: int4 only: inputs per scale and zero point (32, 64, 128 or 256).
    """
    quantization = quantize_checkpoint(
        ckpt, out, method, block_size=block_size, double_quant=double_quant, overwrite=overwrite, group_size=group_size
    )
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 1e6:.2f} MB, {quantization['method']}): python -m picogpt_lightning generate --ckpt {out} ...")
