"""What this project's data modules share: argument checks, loaders built one way, the model hand-off."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer


def require_positive_int(name: str, value, optional: bool = False) -> None:
    """`value` must be an int >= 1 (None too when `optional`); bool is refused, though Python counts it an int."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive int, got {value!r}")


def require_loader_options(batch_size, num_workers, val_fraction) -> None:
    """The arguments every data module here takes, checked where a user sets them."""
    require_positive_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")


class PicoGPTDataModule(L.LightningDataModule):
    """Base of the data modules: subclasses give `collator()`; hparams hold batch_size and num_workers.

    `connect_model` is how the model being trained tells the data what it needs to know of it.
    Lightning calls a data module's `setup` before the model's, so the model calls it in its own
    `setup`, and data that depends on the model builds its datasets on first use, after that call.
    """

    def connect_model(self, tokenizer: Tokenizer | None, block_size: int | None) -> None:
        """The trained model's tokenizer (None if it has none) and block_size; data that needs neither ignores them."""

    def collator(self):
        raise NotImplementedError

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            collate_fn=self.collator(),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._on_cuda(),  # page-locked batches copy to the GPU asynchronously
            **kwargs,
        )

    def _on_cuda(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    @staticmethod
    def _require(dataset, split: str):
        if dataset is None:
            raise RuntimeError(f"the {split} dataset is not built yet; call setup() first (the Trainer does it)")
        return dataset
