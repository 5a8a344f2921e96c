"""Model merging by spherical linear interpolation (slerp), as mergekit does it.

Two fine-tunes of one pretrained model usually lie in one basin of the loss, and a point
between them can keep what each learned. Slerp walks the arc between two weight tensors
instead of the chord, so the merged tensor keeps the parents' norm where lerp shrinks it.

`t` says how far to go from the first parent (t = 0) to the second (t = 1). It can vary
across the model like mergekit's "gradients": a list of values is spread linearly over
the blocks, first value at block 0, last value at the last block. As in mergekit 0.1, the
weights outside the blocks (the token embeddings, the final norm, an untied lm_head) take
the schedule's first value (mergekit 0.0.x gave the ones after the blocks its last). A dict
gives each kind of parameter its own schedule: {"attention": ..., "mlp": ..., "default": ...},
"default" covering norms, embeddings and any kind left out.

The result equals mergekit's slerp of the two exported Hugging Face models tensor for tensor:
attention's fused qkv matrix is merged as its three parts, q, k and v, each with its own angle,
as mergekit merges llama's q_proj, k_proj and v_proj.
"""

import re
from typing import Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from picogpt_lightning.errors import UserError

Schedule = Union[float, Sequence[float]]  # one value, or a gradient over the blocks
MergeSchedule = Union[Schedule, Mapping[str, Schedule]]  # or one of those per parameter kind
KINDS = ("attention", "mlp", "default")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
KIND_OF_MODULE = {"attn": "attention", "mlp": "mlp"}  # a Block's attribute -> the kind of its parameters
FUSED_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


# Written out rather than imported: mergekit merges Hugging Face model directories through its own
# planner, and its slerp is these few lines; the tests check them against the formula.
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical linear interpolation from v0 (t = 0) to v1 (t = 1), mergekit's formula.

    The angle comes from the Frobenius-normalised copies, theta = arccos(<v0/|v0|, v1/|v1|>),
    and the weights sin((1 - t) theta) / sin theta and sin(t theta) / sin theta apply to the
    original tensors. Nearly colinear tensors (|dot| > dot_threshold), where sin theta is
    close to 0, fall back to (1 - t) v0 + t v1. Computed in float32, returned in v0's dtype.
    """
    if v0.shape != v1.shape:
        raise UserError(f"slerp needs tensors of one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    if not (v0.is_floating_point() and v1.is_floating_point()):
        raise UserError(f"slerp interpolates floating-point tensors, got {v0.dtype} and {v1.dtype}")
    a, b = v0.float(), v1.float()
    dot = torch.sum(normalized(a, eps) * normalized(b, eps))
    if dot.abs() > dot_threshold:
        merged = (1 - t) * a + t * b
    else:
        theta = torch.arccos(dot)
        sin_theta = torch.sin(theta)
        merged = (torch.sin(theta - t * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b
    return merged.to(v0.dtype)


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Plain linear interpolation, (1 - t) v0 + t v1 in float32: the baseline slerp is compared with."""
    return ((1 - t) * v0.float() + t * v1.float()).to(v0.dtype)


def normalized(v: torch.Tensor, eps: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > eps else v  # an all-zero tensor has no direction; mergekit leaves it as is


def slerp_state_dicts(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: MergeSchedule, interpolate=slerp
) -> Dict[str, torch.Tensor]:
    """Merges two PicoGPT state dicts of one architecture, each tensor at its own t (see the module doc).

    Keys that hold one tensor in `a` (tied embeddings: lm_head.weight is tok_embeddings.weight)
    hold one merged tensor in the result too. `interpolate(t, v0, v1)` is slerp unless given
    (`lerp` merges linearly with the same schedule).
    """
    check_schedule(t)
    if a.keys() != b.keys():
        differing = sorted(a.keys() ^ b.keys())
        raise UserError(f"the state dicts hold different parameters ({', '.join(differing[:5])}); merge models of one architecture")
    positions = depth_positions(list(a))
    merged: Dict[str, torch.Tensor] = {}
    for name, tensor in a.items():
        tied_to = next((done for done in merged if shares_storage(a[done], tensor)), None)
        if tied_to is not None:
            if not shares_storage(b[tied_to], b[name]):
                raise UserError(f"{name} is tied to {tied_to} in the first model but not in the second; merge models of one architecture")
            merged[name] = merged[tied_to]
            continue
        if tensor.shape != b[name].shape:
            raise UserError(f"{name} has shape {tuple(tensor.shape)} in one model and {tuple(b[name].shape)} in the other")
        value = t_for(name, positions[name], t)
        if FUSED_QKV.match(name):
            widths = qkv_widths(a, name)
            parts = zip(tensor.split(widths, dim=0), b[name].split(widths, dim=0))
            merged[name] = torch.cat([interpolate(value, part_a, part_b) for part_a, part_b in parts], dim=0)
        else:
            merged[name] = interpolate(value, tensor, b[name])
    return merged


def qkv_widths(state_dict: Mapping[str, torch.Tensor], qkv_name: str) -> Tuple[int, int, int]:
    """The rows of q, k and v in a block's fused projection, read off the shapes: the output
    projection takes n_head * head_size inputs, and k and v share the remaining rows equally."""
    attention = qkv_name.rsplit("qkv.", 1)[0]
    query_width = state_dict[attention + "proj.weight"].shape[1]
    key_width = (state_dict[qkv_name].shape[0] - query_width) // 2
    return query_width, key_width, key_width


def t_for(name: str, position: float, t: MergeSchedule) -> float:
    """The t of parameter `name` at `position` (0 = first block, 1 = last) under schedule `t`."""
    if isinstance(t, Mapping):
        t = t.get(parameter_kind(name), t["default"])
    if isinstance(t, (int, float)):
        return float(t)
    # mergekit's gradient: the values sit at evenly spaced points from the first block to the last
    return float(np.interp(position, np.linspace(0.0, 1.0, len(t)), t))


def parameter_kind(name: str) -> str:
    """"attention" or "mlp" for the parameters of a block's attention or MLP, else "default"."""
    inside_block = BLOCK_KEY.sub("", name)
    if inside_block == name:
        return "default"
    return KIND_OF_MODULE.get(inside_block.split(".")[0], "default")


def depth_positions(names: Sequence[str]) -> Dict[str, float]:
    """Each parameter's place in the schedule, as mergekit 0.1 places them: block i of n at
    i / (n - 1) (a single block at 1), every weight outside the blocks at 0."""
    blocks = [int(match.group(1)) for match in map(BLOCK_KEY.match, names) if match]
    last_block = max(blocks, default=0)
    positions = {}
    for name in names:
        match = BLOCK_KEY.match(name)
        positions[name] = (int(match.group(1)) / last_block if last_block else 1.0) if match else 0.0
    return positions


def shares_storage(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()


def check_schedule(t: MergeSchedule) -> None:
    """One-line errors for a t that is not a number in [0, 1], a non-empty list of them, or a dict of those."""
    if isinstance(t, Mapping):
        unknown = sorted(set(t) - set(KINDS))
        if unknown:
            raise UserError(f"unknown parameter kind(s) {unknown} in t; use the keys {list(KINDS)}")
        if "default" not in t:
            raise UserError(f"a per-kind t needs a 'default' entry for norms and embeddings, got keys {sorted(t)}")
        for kind, schedule in t.items():
            check_values(schedule, f"t[{kind!r}]")
    else:
        check_values(t, "t")


def check_values(schedule: Schedule, label: str) -> None:
    values = [schedule] if isinstance(schedule, (int, float)) and not isinstance(schedule, bool) else schedule
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise UserError(f"{label} must be a number in [0, 1] or a non-empty list of them, got {schedule!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"{label} must hold numbers in [0, 1] (0 = first model, 1 = second), got {value!r}")
