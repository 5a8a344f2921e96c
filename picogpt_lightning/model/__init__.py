"""The model in pure PyTorch: nothing here imports Lightning or knows about data."""

from picogpt_lightning.model.cache import DynamicCache, KVCache, StaticCache, StaticKVCache
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.gpt import PicoGPT, PicoGPTOutput

__all__ = ["DynamicCache", "KVCache", "PicoGPT", "PicoGPTConfig", "PicoGPTOutput", "StaticCache", "StaticKVCache"]
