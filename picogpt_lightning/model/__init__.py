"""The model in pure PyTorch: nothing here imports Lightning or knows about data."""

from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.gpt import PicoGPT, PicoGPTOutput

__all__ = ["PicoGPT", "PicoGPTConfig", "PicoGPTOutput"]
