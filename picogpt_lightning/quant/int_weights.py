"""Weight-only int8 and int4 linear layers, the formats gpt-fast and torchao deploy, on torch's CPU kernels.

    int8: per output channel, symmetric:   s = max|W_n| / 127.5,  q = clamp(round(W / s), -128, 127),  W ~ q * s
    int4: per group of `group_size` inputs, asymmetric (torchao's tinygemm convention, gpt-fast's int4):
          s = (max - min) / 15,  z = min + 8 s,  q = clamp(round((W - min) / s), 0, 15),  W ~ (q - 8) * s + z

Scales and zero points are stored in bfloat16, as the kernels read them; codes are computed
against those stored values, so the dequantized weight is exactly what the kernel multiplies.
torchao's int8/int4 weight-only configs reach these same aten kernels through tensor subclasses,
which this torch-only tier does not import and weights_only loading would have to allow-list; so
the layers call the kernels directly, with torchao's formulas (the tests hold the two equal).
"""

from typing import Dict, Iterable

import torch
from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant.kernels import (
    ACTIVATION_DTYPE, INT4_ZERO_CODE, KernelWeights, int4_matmul, int4_shape_problem, int8_matmul, pack_int4,
    unpack_int4,
)
from picogpt_lightning.quant.nf4 import pack_nibbles, unpack_nibbles
from picogpt_lightning.quant.replace import replace_linears

INT4_DEFAULT_GROUP_SIZE = 32  # gpt-fast's default: small groups keep a small model's perplexity


def int8_quantize(weight: torch.Tensor):
    """(codes int8 (N, K), bfloat16 scales (N,)) of a weight, per output channel."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps).to(ACTIVATION_DTYPE)
    codes = (weight * (1.0 / scales.float()[:, None])).round().clamp(-128, 127).to(torch.int8)
    return codes, scales


def int4_quantize(weight: torch.Tensor, group_size: int):
    """(codes uint8 in 0..15 (N, K), bfloat16 scales and zero points (K / group, N, 2)), per group of inputs."""
    weight = weight.detach().float()
    groups = weight.view(weight.shape[0], -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-6)
    zeros = (low + scales * INT4_ZERO_CODE).to(ACTIVATION_DTYPE)
    scales = scales.to(ACTIVATION_DTYPE)
    minimum = zeros - scales * INT4_ZERO_CODE  # in bfloat16, as torchao rounds it
    codes = ((groups - minimum.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
    return codes.view_as(weight).to(torch.uint8), scales_and_zeros


class Int8WeightLinear(nn.Module):
    """A linear layer with int8 weights and one bfloat16 scale per output channel, on the int8 kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=ACTIVATION_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "Int8WeightLinear":
        int8 = cls(layer.in_features, layer.out_features, layer.bias is not None)
        codes, scales = int8_quantize(layer.weight)
        int8.weight_int8.copy_(codes)
        int8.scales.copy_(scales)
        if layer.bias is not None:
            int8.bias.copy_(layer.bias.detach())
        return int8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_int8.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_matmul(x, self.weight_int8, self.scales)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4WeightLinear(KernelWeights):
    """A linear layer with int4 weights, group-wise bfloat16 scales and zero points, on the int4 kernel.

    In memory: the kernel's packed codes only. In a file: `codes` (two per byte, first in the
    high nibble, row by row) and `scales_and_zeros`, which any CPU converts to its own layout.
    """

    FILE_TENSORS = ("codes", "scales_and_zeros")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = INT4_DEFAULT_GROUP_SIZE):
        super().__init__()
        problem = int4_shape_problem(in_features, out_features, group_size)
        if problem:
            raise UserError(f"int4 cannot hold a {out_features}x{in_features} weight: {problem}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        codes = torch.full((out_features, in_features), INT4_ZERO_CODE, dtype=torch.uint8)
        self.register_buffer("packed", pack_int4(codes), persistent=False)
        sz = torch.zeros(in_features // group_size, out_features, 2, dtype=ACTIVATION_DTYPE)
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, layer: nn.Linear, group_size: int = INT4_DEFAULT_GROUP_SIZE) -> "Int4WeightLinear":
        int4 = cls(layer.in_features, layer.out_features, layer.bias is not None, group_size)
        codes, scales_and_zeros = int4_quantize(layer.weight, group_size)
        int4.set_codes(codes, scales_and_zeros)
        if layer.bias is not None:
            int4.bias.copy_(layer.bias.detach())
        return int4

    def set_codes(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> None:
        self.packed = pack_int4(codes)
        self.scales_and_zeros = scales_and_zeros.to(ACTIVATION_DTYPE).contiguous()

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.in_features, self.group_size)

    def file_tensors(self) -> Dict[str, torch.Tensor]:
        return {"codes": pack_nibbles(self.codes().flatten()).view(self.out_features, -1),
                "scales_and_zeros": self.scales_and_zeros}

    def file_shapes(self) -> Dict[str, tuple]:
        return {"codes": (self.out_features, self.in_features // 2), "scales_and_zeros": tuple(self.scales_and_zeros.shape)}

    def load_file_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        codes = unpack_nibbles(tensors["codes"].flatten(), self.out_features * self.in_features)
        self.set_codes(codes.view(self.out_features, self.in_features), tensors["scales_and_zeros"])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(q - 8) * s + z per group, in float32, returned in `dtype`."""
        scales, zeros = (self.scales_and_zeros[..., i].float().t().repeat_interleave(self.group_size, 1) for i in (0, 1))
        return ((self.codes().float() - INT4_ZERO_CODE) * scales + zeros).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int4_matmul(x, self.packed, self.group_size, self.scales_and_zeros)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def quantize_int8(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Every nn.Linear outside `skip` -> Int8WeightLinear, in place."""
    return replace_linears(model, Int8WeightLinear.from_linear, "int8", skip)


def quantize_int4(model: nn.Module, group_size: int = INT4_DEFAULT_GROUP_SIZE, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Every nn.Linear outside `skip` -> Int4WeightLinear with `group_size` inputs per scale, in place."""
    return replace_linears(model, lambda layer: Int4WeightLinear.from_linear(layer, group_size), "int4", skip)
