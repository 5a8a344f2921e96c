"""picogpt_lightning: small llama-like GPTs trained end to end with PyTorch Lightning.

`PicoGPT`, `PicoGPTConfig` and `PicoGPTOutput` load with their first use: so that
`python -m picogpt_lightning` can settle OpenMP's threads before torch starts it.
"""

__version__ = "0.1.0"
__all__ = ["PicoGPT", "PicoGPTConfig", "PicoGPTOutput", "__version__"]
MODEL_NAMES = ("PicoGPT", "PicoGPTConfig", "PicoGPTOutput")


def __getattr__(name: str):
    if name in MODEL_NAMES:
        from picogpt_lightning import model

        return getattr(model, name)
    raise AttributeError(f"module 'picogpt_lightning' has no attribute {name!r}")
