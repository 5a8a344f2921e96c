"""NF4 weights (QLoRA's 4-bit NormalFloat), stored packed and dequantized on the fly.

Each weight tensor is cut into blocks of `block_size` values; a block is divided by its
absolute maximum and every value becomes the nearest of the 16 NF4 code values, two codes
to a byte. Double quantization stores the block absmax constants themselves in 8 bits:
minus their mean, in blocks of 256, each the nearest value of bitsandbytes' signed
8-bit dynamic map times the block's absmax.

Written in plain PyTorch, with bitsandbytes' codebooks, rounding and byte layout, so a
CPU-only install needs no bitsandbytes and the tests hold the two to the same result.
"""

import math
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant import nf4_kernel
from picogpt_lightning.quant.replace import replace_linears

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, appendix E)
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
NF4_ZERO = 7  # the index of 0.0
ABSMAX_BLOCK_SIZE = 256  # bitsandbytes' block size for the double-quantized absmax constants


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), sorted.

    Dettmers' dynamic tree quantization: for each exponent 10**-6 .. 10**0 a growing number of
    evenly spaced fractions in [0.1, 1], with both signs, plus 0 and 1.
    """
    values = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + i)
        values += (magnitude * means).tolist() + (-magnitude * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


def blockwise_quantize(values: torch.Tensor, code: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest code value per element as uint8, absmax per block), as bitsandbytes computes them.

    The last block may be short (zeros pad it; they change no block's absmax). Elements are
    scaled by a multiply with 1/absmax, not a division, because bitsandbytes rounds that way.
    """
    flat = values.detach().reshape(-1).float()
    numel = flat.numel()
    blocks = F.pad(flat, (0, -numel % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:numel]
    code = code.to(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2  # nearest value of a sorted code = bucket between midpoints
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def blockwise_dequantize(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    numel = indices.numel()
    values = code.to(absmax.device)[indices.long()]
    values = F.pad(values, (0, -numel % block_size)).view(-1, block_size) * absmax[:, None]
    return values.reshape(-1)[:numel]


def pack_nibbles(indices: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' layout); `fill` pads an odd count."""
    indices = F.pad(indices, (0, indices.numel() % 2), value=fill)
    return (indices[0::2] << 4) | indices[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:numel]


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored in NF4: decoding (up to nf4_kernel.MAX_ROWS activation rows)
    runs the fused kernel of nf4_kernel.py; longer inputs dequantize in the input's dtype and call F.linear."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64, double_quant: bool = True
    ):
        super().__init__()
        if not isinstance(block_size, int) or block_size <= 0:
            raise UserError(f"NF4 block_size must be a positive integer, got {block_size!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        numel = in_features * out_features
        n_blocks = math.ceil(numel / block_size)
        self.register_buffer("packed", torch.zeros(math.ceil(numel / 2), dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8))
            self.register_buffer("absmax_scales", torch.ones(math.ceil(n_blocks / ABSMAX_BLOCK_SIZE)))
            self.register_buffer("absmax_offset", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.ones(n_blocks))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # the fused kernel's inputs, derived from the file's tensors whenever those change
        self.fused = nf4_kernel.supports(in_features, block_size)
        self.register_buffer("code", NF4_CODE.clone(), persistent=False)
        self.register_buffer("decoded_absmax", torch.ones(n_blocks), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.decode_absmax())

    def decode_absmax(self) -> None:
        with torch.no_grad():
            self.decoded_absmax = self.block_absmax().float().clone()

    @classmethod
    def from_linear(cls, layer: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        return cls.from_weight(layer.weight, layer.bias, block_size, double_quant)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, block_size: int = 64, double_quant: bool = True
    ) -> "NF4Linear":
        out_features, in_features = weight.shape
        nf4 = cls(in_features, out_features, bias is not None, block_size, double_quant)
        indices, absmax = blockwise_quantize(weight, NF4_CODE, block_size)
        nf4.packed.copy_(pack_nibbles(indices, fill=NF4_ZERO))  # bitsandbytes pads with the code of 0.0
        if double_quant:
            offset = absmax.mean()  # the constants are all positive: centring them uses the 8-bit range's sign
            codes, scales = blockwise_quantize(absmax - offset, DYNAMIC_CODE, ABSMAX_BLOCK_SIZE)
            nf4.absmax_codes.copy_(codes)
            nf4.absmax_scales.copy_(scales)
            nf4.absmax_offset.copy_(offset)
        else:
            nf4.absmax.copy_(absmax)
        if bias is not None:
            nf4.bias.copy_(bias.detach())
        nf4.decode_absmax()
        return nf4

    def block_absmax(self) -> torch.Tensor:
        """Each block's absmax constant, decoded from 8 bits when double-quantized."""
        if not self.double_quant:
            return self.absmax
        centred = blockwise_dequantize(self.absmax_codes, self.absmax_scales, DYNAMIC_CODE, ABSMAX_BLOCK_SIZE)
        return centred + self.absmax_offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full (out_features, in_features) weight, computed in float32 and returned in `dtype`."""
        numel = self.in_features * self.out_features
        indices = unpack_nibbles(self.packed, numel)
        weight = blockwise_dequantize(indices, self.block_absmax(), NF4_CODE, self.block_size)
        return weight.view(self.out_features, self.in_features).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // x.shape[-1]
        # the kernel has no backward: an input that needs gradients (QLoRA training) takes F.linear
        needs_grad = x.requires_grad and torch.is_grad_enabled()
        # the kernel is built on the first NF4 matmul on CPU (eager: a compiled graph only reads whether it is there)
        ready = not needs_grad and self.fused and x.device.type == "cpu" and (
            nf4_kernel.built() if torch.compiler.is_compiling() else nf4_kernel.available())
        if not (ready and 0 < rows <= nf4_kernel.MAX_ROWS):
            return F.linear(x, self.dequantize(x.dtype), bias)
        flat = x.reshape(rows, self.in_features)
        out = nf4_kernel.nf4_linear(flat, self.packed, self.decoded_absmax, self.code, self.out_features, self.block_size)
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if bias is None else out + bias

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes, under the name peft looks for to place adapters on a quantized layer's device."""
        return self.packed

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}"
        )


def quantize_nf4(
    model: nn.Module, block_size: int = 64, double_quant: bool = True, skip: Iterable[str] = ("lm_head",)
) -> nn.Module:
    """Replaces every nn.Linear of `model` by an NF4Linear, in place, and returns the model.

    A layer is left in full precision when its name, or its attribute name, is in `skip`
    (by default the lm_head, which a tied model shares with the embeddings).
    """
    return replace_linears(model, lambda layer: NF4Linear.from_linear(layer, block_size, double_quant), "NF4", skip)
