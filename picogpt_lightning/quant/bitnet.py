"""BitNet linear layers: 1.58-bit (ternary) and 1-bit (binary) weights, 8-bit activations.

Training keeps full-precision latent weights and quantizes them on every forward
(BitNet b1.58's training notes):

    x_n = x / rms(x)                                   no learned gain, eps 1e-6
    a   = clamp(round(x_n * 127 / max|x_n|), -128, 127) * max|x_n| / 127     per token
    w   = clamp(round(W / s), -1, 1) * s,   s = mean|W|                      per tensor (1.58 bits)
    w   = sign(W - mean(W)) * mean|W|                                         per tensor (1 bit)
    y   = linear(a, w)

Gradients pass the rounding unchanged (straight-through estimator). After training,
`pack_bitnet` swaps each BitLinear for a `PackedBitLinear`, which writes each weight as its
code (2 bits or 1 bit) plus one scale and decodes through torch's int8 kernel what the training
layer computed, up to the kernel's bfloat16 sums.

Pure PyTorch: the model package builds these layers, so nothing here imports Lightning.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant.kernels import ACTIVATION_DTYPE, KernelWeights, int8_matmul

BITNET_KINDS = {"bitnet1.58": 2, "bitnet1": 1}  # linear kind -> bits per packed weight
RMS_EPS = 1e-6
SCALE_EPS = 1e-5  # floor for max|x_n| and mean|W|, so an all-zero row or tensor stays finite


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward value exactly `quantized`, gradient as if it were `x` (the identity).

    Written as q + (x - x) with q and one x detached rather than x + (q - x).detach(): the same
    gradient, but adding an exact zero cannot round, so the packed model reproduces the
    training model bit for bit.
    """
    return quantized.detach() + (x - x.detach())


def quantize_activations(x_n: torch.Tensor) -> torch.Tensor:
    """Per-token absmax quantization to 8 bits, returned dequantized."""
    scale = 127.0 / x_n.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    return (x_n * scale).round().clamp(-128, 127) / scale


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale of both kinds: the mean absolute value (a 0-d tensor: no host sync)."""
    return weight.abs().mean().clamp(min=SCALE_EPS)


def weight_codes(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Each weight's code as a float: {-1, 0, 1} for 1.58 bits, {-1, 1} for 1 bit."""
    if kind == "bitnet1.58":
        return (weight / weight_scale(weight)).round().clamp(-1, 1)
    # the 1-bit BitNet paper's Sign: +1 above the mean, -1 at or below it (never 0, so 1 bit holds it)
    return torch.where(weight > weight.mean(), 1.0, -1.0).to(weight.dtype)


def quantize_weights(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return weight_codes(weight, kind) * weight_scale(weight)


def bitnet_linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """linear(quantized activations of RMS-normalised x, weight); both layers share it."""
    x_n = F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)
    return F.linear(straight_through(x_n, quantize_activations(x_n)), weight, bias)


class BitLinear(nn.Linear):
    """A drop-in nn.Linear that trains BitNet weights: full-precision latent weights, quantized forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kind: str = "bitnet1.58"):
        if kind not in BITNET_KINDS:
            raise UserError(f"BitLinear kind must be one of {tuple(BITNET_KINDS)}, got {kind!r}")
        super().__init__(in_features, out_features, bias=bias)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = straight_through(self.weight, quantize_weights(self.weight, self.kind))
        return bitnet_linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind}"


# ---- packing: codes at 2 or 1 bits each, several to a byte ---------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integer codes < 2**bits, flattened, packed 8 // bits to a uint8 (first code in the low bits)."""
    per_byte = 8 // bits
    flat = codes.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % per_byte)).view(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of `pack_codes`: the first `numel` codes as uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[:, None] >> shifts) & mask).flatten()[:numel]


class PackedBitLinear(KernelWeights):
    """Inference-only BitNet layer: the same output as the BitLinear it came from, through the int8 kernel.

    The ternary or binary codes c are int8 weights with unit scales, so the kernel sums q . c exactly
    for the integer activations q (|q| <= 128, exact in bfloat16) and rounds only the sum to bfloat16;
    the per-token and per-tensor scales are applied after, in float32. The int8 kernel, not the int4
    one, by measurement on this CPU (AVX2): at 4x128 int8 decoded 1.8x fp32's tokens/s where int4 gave
    1.0x, while at 6x384 int4 was only ~6% faster. In a file: `packed` (2 or 1 bits a code) and `scale`.
    """

    FILE_TENSORS = ("packed",)  # the scale is an ordinary buffer

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kind: str = "bitnet1.58"):
        super().__init__()
        if kind not in BITNET_KINDS:
            raise UserError(f"PackedBitLinear kind must be one of {tuple(BITNET_KINDS)}, got {kind!r}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.register_buffer("kernel_codes", torch.zeros(out_features, in_features, dtype=torch.int8), persistent=False)
        self.register_buffer("unit_scales", torch.ones(out_features, dtype=ACTIVATION_DTYPE), persistent=False)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.kind)
        with torch.no_grad():
            weight = layer.weight.float()
            packed.set_codes(weight_codes(weight, layer.kind))
            packed.scale.copy_(weight_scale(weight))
            if layer.bias is not None:
                packed.bias.copy_(layer.bias)
        return packed

    def set_codes(self, codes: torch.Tensor) -> None:
        """Codes in {-1, 0, 1} (or {-1, 1}) of shape (out, in), as the kernel's int8 weights."""
        self.kernel_codes = codes.to(torch.int8).contiguous()

    def codes(self) -> torch.Tensor:
        return self.kernel_codes.float()

    def file_tensors(self) -> Dict[str, torch.Tensor]:
        codes = self.codes()
        # ternary codes -1, 0, 1 stored as 0, 1, 2; binary codes -1, 1 as 0, 1
        stored = codes + 1 if self.kind == "bitnet1.58" else (codes + 1) / 2
        return {"packed": pack_codes(stored, BITNET_KINDS[self.kind])}

    def file_shapes(self) -> Dict[str, tuple]:
        numel = self.in_features * self.out_features
        return {"packed": (-(-numel // (8 // BITNET_KINDS[self.kind])),)}

    def load_file_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        stored = unpack_codes(tensors["packed"], BITNET_KINDS[self.kind], self.in_features * self.out_features).float()
        codes = stored - 1 if self.kind == "bitnet1.58" else stored * 2 - 1
        self.set_codes(codes.view(self.out_features, self.in_features))

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight: code times scale."""
        return (self.codes() * self.scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_n = F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)
        step = 127.0 / x_n.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)  # quantize_activations' scale
        levels = (x_n * step).round().clamp(-128, 127)
        out = int8_matmul(levels, self.kernel_codes, self.unit_scales) * (self.scale / step)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def pack_bitnet(model: nn.Module) -> nn.Module:
    """Replaces every BitLinear in `model` by its PackedBitLinear, in place; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                setattr(module, child_name, PackedBitLinear.from_bitlinear(child))
    return model
