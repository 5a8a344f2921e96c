"""`python -m picogpt_lightning quantize`: a full-precision checkpoint in, a packed quantized file out.

The file format itself (what the packed entry holds, how loading rebuilds packed layers)
lives in picogpt_lightning/checkpoints.py.
"""

import os

from picogpt_lightning import checkpoints
from picogpt_lightning.model import PicoGPT


def quantize_checkpoint(source, out, method: str, block_size: int = 64, double_quant: bool = True, overwrite: bool = False) -> dict:
    """Reads a full-precision checkpoint, packs its linear layers and writes `out`; returns the quantization entry.

    "nf4": every linear layer inside the blocks in NF4 (the lm_head, tied to the embeddings, stays full
    precision). "bitnet": a model trained with linear="bitnet1.58" or "bitnet1", its weights as 2-bit or
    1-bit codes plus one scale per tensor, computing exactly what the training model computes.
    """
    if method not in checkpoints.QUANTIZATION_METHODS:
        raise ValueError(f"quantization method must be one of {checkpoints.QUANTIZATION_METHODS}, got {method!r}")
    out = os.fspath(out)
    checkpoint = checkpoints.load(source)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite true")
    if os.path.abspath(out) == os.path.abspath(checkpoint.path):
        raise ValueError(f"--out {out} is the input checkpoint; write the quantized model to another file")
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
    checkpoints.build_packed_layers(model, quantization, checkpoint.path)
    extra = {"global_step": checkpoint.global_step}  # how long the source model trained, for the record
    if checkpoint.tokenizer_dict is not None:
        extra[checkpoints.TOKENIZER_KEY] = checkpoint.tokenizer_dict
    checkpoints.save_quantized(out, model, quantization, **extra)
    return quantization
