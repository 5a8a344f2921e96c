"""What a recipe and the data module it trains on tell each other, through Lightning's public Trainer API.

The recipe reaches its data module as `trainer.datamodule` (None when the Trainer was given
bare loaders) and talks to it only through the protocols below, which this project's data
modules implement; any other data module simply lacks what it does not implement.
"""

from typing import List, Optional, Protocol, runtime_checkable

import lightning as L
from torch.utils.data import DataLoader

from picogpt_lightning.tokenizer import Tokenizer


@runtime_checkable
class ModelAwareData(Protocol):
    """Data that needs the trained model's tokenizer (if it has one) and block_size; the recipe
    calls this in its `setup`, which Lightning runs after the data module's."""

    def connect_model(self, tokenizer: Optional[Tokenizer], block_size: Optional[int]) -> None: ...


@runtime_checkable
class TokenizedData(Protocol):
    """Data tokenized by a tokenizer the recipe stores in its checkpoints."""

    @property
    def tokenizer(self) -> Tokenizer: ...


@runtime_checkable
class IndexedData(Protocol):
    """Data whose examples carry indices, every split in a fixed order (DPO's precomputed reference)."""

    def ordered_dataloaders(self) -> List[DataLoader]: ...


def attached_trainer(module: L.LightningModule) -> Optional[L.Trainer]:
    """The module's Trainer, or None before one is attached (Lightning's `trainer` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def attached_datamodule(module: L.LightningModule) -> Optional[L.LightningDataModule]:
    trainer = attached_trainer(module)
    return None if trainer is None else trainer.datamodule


def data_tokenizer(datamodule) -> Optional[Tokenizer]:
    return datamodule.tokenizer if isinstance(datamodule, TokenizedData) else None
