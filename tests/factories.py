"""The tiny models the tests build: one place for their sizes, each test file overriding what it needs."""

import torch

from picogpt_lightning import PicoGPT, PicoGPTConfig

# small enough for 2 CPU cores, big enough for GQA (4 heads, 2 key/value groups) and two blocks
TINY = dict(vocab_size=40, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)


def tiny_config(**overrides) -> PicoGPTConfig:
    return PicoGPTConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> PicoGPT:
    """A freshly initialised tiny model in eval mode, the same for the same seed."""
    torch.manual_seed(seed)
    return PicoGPT(tiny_config(**overrides)).eval()


def randomize(model: PicoGPT, *, only_norms_and_biases: bool = False, low: float = 0.5, high: float = 1.5) -> PicoGPT:
    """Random values where a fresh model has constants (norm gains of 1, zero biases), or in every weight:
    an exact 1 or 0 would hide a swapped norm or a dropped bias from a comparison."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not only_norms_and_biases:
                parameter.normal_()
            elif "norm" in name or name.endswith(".bias"):
                parameter.uniform_(low, high)
    return model
