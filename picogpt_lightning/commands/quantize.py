"""`python -m picogpt_lightning quantize`: a full-precision checkpoint in, a packed quantized file out.

The file format itself (what the packed entry holds, how loading rebuilds packed layers)
lives in picogpt_lightning/checkpoints.py.
"""

import os
from typing import Literal

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.outputs import check_output
from picogpt_lightning.errors import UserError
from picogpt_lightning.quant import QUANTIZATION_METHODS, build_packed_layers


def quantize_checkpoint(source, out, method: str, block_size: int = 64, double_quant: bool = True, overwrite: bool = False) -> dict:
    """Reads a full-precision checkpoint, packs its linear layers and writes `out`; returns the quantization entry.

    "nf4": every linear layer inside the blocks in NF4 (the lm_head, tied to the embeddings, stays full
    precision). "bitnet": a model trained with linear="bitnet1.58" or "bitnet1", its weights as 2-bit or
    1-bit codes plus one scale per tensor, computing exactly what the training model computes.
    """
    if method not in QUANTIZATION_METHODS:
        raise UserError(f"quantization method must be one of {QUANTIZATION_METHODS}, got {method!r}")
    check_output(out, overwrite, inputs=[source.path if isinstance(source, checkpoints.Checkpoint) else source])
    checkpoint = checkpoints.load(source)
    checkpoints.require_unquantized(checkpoint, "quantization again")
    config = checkpoint.resolve_config()
    if method == "bitnet" and config.linear == "linear":
        raise checkpoints.CheckpointError(
            f"{checkpoint.path} is a full-precision model (linear='linear'), not BitNet; use --method nf4, or train "
            "with linear='bitnet1.58' or 'bitnet1' (configs/bitnet.yaml) to pack it as BitNet"
        )
    if method == "nf4" and config.linear != "linear":
        raise checkpoints.CheckpointError(
            f"{checkpoint.path} is a BitNet model (linear={config.linear!r}); pack it with --method bitnet"
        )
    model = PicoGPT.from_checkpoint(checkpoint).eval()
    if method == "nf4":
        quantization = {"method": "nf4", "block_size": block_size, "double_quant": double_quant, "skip": ["lm_head"]}
    else:
        quantization = {"method": "bitnet"}
    build_packed_layers(model, quantization, checkpoint.path)
    extra = {"global_step": checkpoint.global_step}  # how long the source model trained, for the record
    if checkpoint.tokenizer_dict is not None:
        extra[checkpoints.TOKENIZER_KEY] = checkpoint.tokenizer_dict
    checkpoints.save_quantized(out, model, quantization, **extra)
    return quantization


def quantize(
    ckpt: str,
    method: Literal["nf4", "bitnet"],
    out: str,
    block_size: int = 64,
    double_quant: bool = True,
    overwrite: bool = False,
) -> None:
    """Write a checkpoint with packed quantized weights (NF4 or BitNet), which generate and PicoGPT.from_checkpoint load.

    Args:
        ckpt: a full-precision checkpoint written by training (model config and tokenizer inside).
        method: "nf4": 4-bit NormalFloat weights for any model trained with linear="linear"; "bitnet": a model trained with linear="bitnet1.58" (2 bits per weight) or "bitnet1" (1 bit), plus one scale per tensor.
        out: the file to write.
        block_size: NF4 only: weights per absmax constant.
        double_quant: NF4 only: store the absmax constants in 8 bits as well (QLoRA's double quantization).
        overwrite: replace out if it already exists.
    """
    quantization = quantize_checkpoint(ckpt, out, method, block_size=block_size, double_quant=double_quant, overwrite=overwrite)
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 1e6:.2f} MB, {quantization['method']}): python -m picogpt_lightning generate --ckpt {out} ...")
