"""RoPE's inverse frequencies, plain or rescaled for longer contexts as Llama 3.x and linear scaling do.

The rescalings are transformers' `rope_parameters` (`_compute_linear_scaling_rope_parameters`,
`_compute_llama3_parameters`); both keep the attention factor at 1, so only the frequencies change.
"""

import math
from typing import Optional

import torch

from picogpt_lightning.errors import UserError

# each scaling and the fields it needs besides rope_type
SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: Optional[dict]) -> Optional[dict]:
    """The scaling as a plain dict of the fields it uses, or a one-line error naming what is wrong."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise UserError(f"PicoGPTConfig.rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SCALINGS:
        raise UserError(
            f"rope_scaling rope_type {kind!r} is not supported; PicoGPT computes {['default', *SCALINGS]}"
        )
    missing = [name for name in SCALINGS[kind] if not isinstance(scaling.get(name), (int, float))]
    if missing:
        raise UserError(f"rope_scaling of rope_type {kind!r} needs numbers for {missing}, got {scaling!r}")
    checked = {"rope_type": kind, **{name: float(scaling[name]) for name in SCALINGS[kind]}}
    if "original_max_position_embeddings" in checked:  # a length: an int in config.json
        checked["original_max_position_embeddings"] = int(checked["original_max_position_embeddings"])
    if checked["factor"] <= 0 or (kind == "llama3" and checked["high_freq_factor"] <= checked["low_freq_factor"]):
        raise UserError(f"rope_scaling {scaling!r}: factor must be > 0 and high_freq_factor > low_freq_factor")
    return checked


def inverse_frequencies(head_size: int, theta: float, scaling: Optional[dict], device=None) -> torch.Tensor:
    """(head_size / 2,) float32 frequencies of the rotary angles: theta^(-2i / head_size), then rescaled."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.float32, device=device) / head_size
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # positions divided by factor: every frequency slower alike
        return inv_freq / scaling["factor"]
    return llama3_frequencies(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})


def llama3_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1: wavelengths longer than the original context / low_freq_factor slow down by factor, those
    shorter than context / high_freq_factor stay, and the band between blends the two smoothly."""
    context = original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high_freq_factor) & (wavelength <= context / low_freq_factor)
    return torch.where(medium, blended, scaled)
