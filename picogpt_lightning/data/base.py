"""What this project's data modules share: argument checks, loaders built one way, the model hand-off."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from picogpt_lightning.data.samplers import ResumableSampler
from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer


MAX_VAL_WINDOWS = 2000  # validation windows by default: nanoGPT's 200 batches at batch size 10


def check_block_size(data_block_size: int, model_block_size: int | None) -> None:
    """Samples longer than the model's block_size would train it on positions past the context it is built for."""
    if model_block_size is not None and data_block_size > model_block_size:
        raise UserError(
            f"the data's block_size ({data_block_size}) exceeds the model's ({model_block_size}); "
            "set both to the same value"
        )


def require_positive_int(name: str, value, optional: bool = False) -> None:
    """`value` must be an int >= 1 (None too when `optional`); bool is refused, though Python counts it an int."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive int, got {value!r}")


def require_loader_options(batch_size, num_workers, val_fraction=None) -> None:
    """The arguments every data module here takes (val_fraction those that split text), checked where a user sets them."""
    require_positive_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")


class PicoGPTDataModule(L.LightningDataModule):
    """Base of the data modules: subclasses give `collator()`; hparams hold batch_size and num_workers.

    `connect_model` is how the model being trained tells the data what it needs to know of it.
    Lightning calls a data module's `setup` before the model's, so the model calls it in its own
    `setup`, and data that depends on the model builds its datasets on first use, after that call.

    A train loader built through `_resumable(sampler)` resumes mid-epoch: Lightning restores the
    model, the optimizer and its loops from a checkpoint, not where the train loader stood, so
    `state_dict` saves that (the epoch, and the samples of this rank's share trained on).
    """

    _train_sampler: ResumableSampler | None = None
    _resume_position: tuple[int, int] | None = None  # (epoch, samples done) of a resumed run (load_state_dict)

    def _resumable(self, sampler: ResumableSampler) -> ResumableSampler:
        if self._resume_position is not None:
            # set here, not left to Lightning's set_epoch: a resumed loader starts before Lightning calls it
            epoch, samples_done = self._resume_position
            sampler.set_epoch(epoch)
            sampler.resume_at(samples_done)
            self._resume_position = None
        self._train_sampler = sampler
        return sampler

    def _shard(self) -> dict:
        """This rank's place among the ranks, for samplers that take their share themselves."""
        trainer = self.trainer
        return dict(num_replicas=trainer.world_size, rank=trainer.global_rank) if trainer is not None else {}

    def state_dict(self) -> dict:
        trainer, sampler = self.trainer, self._train_sampler
        if trainer is None or sampler is None or trainer.state.fn != "fit":
            return {}
        samples_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.hparams.batch_size
        if samples_done >= sampler.num_samples:  # a finished epoch: the next one starts from its beginning
            return {"train_epoch": sampler.epoch + 1, "train_samples_done": 0}
        return {"train_epoch": sampler.epoch, "train_samples_done": samples_done}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_epoch" in state_dict:
            self._resume_position = (int(state_dict["train_epoch"]), int(state_dict["train_samples_done"]))

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
