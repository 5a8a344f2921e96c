"""torch's weight-only int8 and int4 CPU kernels, and the module base that keeps a file format apart from them.

    _weight_int8pack_mm(x, W int8 (N, K), scales (N,))             y = x @ (W * scales)^T
    _weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)  y = x @ ((q - 8) * s + z)^T, per group of K

Measured on this project's CPU (AVX2, one thread, a 1536x384 weight among 56 MB of them, so
read from memory as in decoding): fp32 F.linear 384 us, int8 kernel 119 us, int4 kernel 97 us
with bfloat16 activations; with float32 or float16 activations both kernels run 3-10x slower than
F.linear. So activations enter the kernels in bfloat16 (ACTIVATION_DTYPE) and leave in the input's
dtype: the weights are exact, the activations and sums rounded to bfloat16 (8 significant bits).

The int4 kernel's packed layout is its own (it differs between CPUs and devices), so files hold
portable codes and scales, and `KernelWeights` converts between the two when loading and saving.
"""

from typing import Dict

import torch
from torch import nn

ACTIVATION_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
INT4_ZERO_CODE = 8  # the kernel reads code q as q - 8, then scales and shifts


def int8_matmul(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight_int8 * scales[:, None])^T through the int8 kernel; scales in ACTIVATION_DTYPE."""
    flat = x.reshape(-1, x.shape[-1]).to(ACTIVATION_DTYPE)
    out = torch.ops.aten._weight_int8pack_mm(flat, weight_int8, scales.to(ACTIVATION_DTYPE))  # survives model.to(dtype)
    return out.view(*x.shape[:-1], weight_int8.shape[0]).to(x.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> the int4 kernel's packed uint8 layout (N, K / 2)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W[n, k] = (q[n, k] - 8) * s[k // group, n] + z[k // group, n]; (K / group, N, 2) bfloat16 s, z."""
    flat = x.reshape(-1, x.shape[-1]).to(ACTIVATION_DTYPE)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scales_and_zeros.to(ACTIVATION_DTYPE))
    return out.view(*x.shape[:-1], scales_and_zeros.shape[1]).to(x.dtype)


def unpack_int4(packed: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """The (N, K) codes back from the kernel's layout, exactly: the kernel itself applied to the identity
    with unit scales and zero shifts gives q - 8 (exact in bfloat16), whatever layout this CPU packs."""
    out_features = packed.shape[0]
    unit = torch.zeros(in_features // group_size, out_features, 2, dtype=ACTIVATION_DTYPE)
    unit[..., 0] = 1.0
    eye = torch.eye(in_features, dtype=ACTIVATION_DTYPE)
    shifted = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, unit)  # (K, N) = (q - 8)^T
    return (shifted.t().float() + INT4_ZERO_CODE).round().to(torch.uint8)


def int4_group_size(in_features: int, largest: int = 256) -> int:
    """The largest group the kernel accepts that divides in_features (0 when none does)."""
    return max((g for g in INT4_GROUP_SIZES if g <= largest and in_features % g == 0), default=0)


def int4_shape_problem(in_features: int, out_features: int, group_size: int) -> str:
    """Why the int4 kernel cannot hold an (out, in) weight in groups of group_size, or ''."""
    if group_size not in INT4_GROUP_SIZES:
        return f"group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    return ""


class KernelWeights(nn.Module):
    """A layer that holds its weights in a kernel's layout while decoding and writes them in a portable one.

    Subclasses name their file tensors (FILE_TENSORS), give them (`file_tensors`) and take them
    (`load_file_tensors`); the state dict holds exactly those, so a file does not depend on the
    CPU that wrote it and the kernel's copy is the only one kept in memory.
    """

    FILE_TENSORS: tuple = ()

    def file_tensors(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_file_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def file_shapes(self) -> Dict[str, tuple]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # persistent buffers (the bias)
        for name, tensor in self.file_tensors().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = {name: prefix + name for name in self.FILE_TENSORS}
        rest = {key: value for key, value in state_dict.items() if key not in keys.values()}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing = [key for key in keys.values() if key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        expected = self.file_shapes()
        wrong = [
            f"size mismatch for {keys[name]}: copying a param with shape {tuple(state_dict[keys[name]].shape)}, "
            f"the shape in current model is {tuple(expected[name])}"
            for name in self.FILE_TENSORS if tuple(state_dict[keys[name]].shape) != tuple(expected[name])
        ]
        if wrong:
            error_msgs.extend(wrong)
            return
        with torch.no_grad():
            self.load_file_tensors({name: state_dict[key] for name, key in keys.items()})


def resident_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers hold in memory (what decoding reads), shared tensors once."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
