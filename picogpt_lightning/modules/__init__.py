"""LightningModules: thin recipes on one shared base."""

from picogpt_lightning.modules.base import PicoGPTModule
from picogpt_lightning.modules.distill import DistillationModule
from picogpt_lightning.modules.dpo import DPOModule
from picogpt_lightning.modules.lm import LanguageModelModule

__all__ = ["PicoGPTModule", "LanguageModelModule", "DistillationModule", "DPOModule"]
