"""Quantization in pure PyTorch: NF4 weights (QLoRA), int8/int4 weight-only layers and BitNet's 1.58-bit and 1-bit layers.

    quantize_nf4(model)                       # linear layers -> NF4Linear (4-bit, dequantized on the fly)
    quantize_int8(model), quantize_int4(model)  # linear layers -> torch's int8 / int4 weight-only CPU kernels
    PicoGPTConfig(linear="bitnet1.58")        # train with BitLinear; pack_bitnet(model) packs it for inference
    python -m picogpt_lightning quantize --ckpt CKPT --method nf4|int8|int4|bitnet --out FILE
"""

from picogpt_lightning.quant.bitnet import BitLinear, PackedBitLinear, pack_bitnet
from picogpt_lightning.quant.int_weights import Int4WeightLinear, Int8WeightLinear, quantize_int4, quantize_int8
from picogpt_lightning.quant.nf4 import NF4Linear, quantize_nf4
from picogpt_lightning.quant.packing import QUANTIZATION_METHODS, build_packed_layers

__all__ = [
    "BitLinear", "Int4WeightLinear", "Int8WeightLinear", "NF4Linear", "PackedBitLinear", "QUANTIZATION_METHODS",
    "build_packed_layers", "pack_bitnet", "quantize_int4", "quantize_int8", "quantize_nf4",
]
