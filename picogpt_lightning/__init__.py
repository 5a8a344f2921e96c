"""picogpt_lightning: small llama-like GPTs trained end to end with PyTorch Lightning."""

from picogpt_lightning.model import PicoGPT, PicoGPTConfig, PicoGPTOutput

__version__ = "0.1.0"
__all__ = ["PicoGPT", "PicoGPTConfig", "PicoGPTOutput", "__version__"]
