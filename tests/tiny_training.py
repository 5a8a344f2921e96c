"""A tiny model, its data and a quiet CPU trainer, shared by the scaling tests and tests/ddp_run.py."""

from typing import List

import lightning as L

from picogpt_lightning.data import TinyShakespeareDataModule
from picogpt_lightning.model import PicoGPTConfig

SEED = 1337
BLOCK_SIZE = 32


def tiny_config(**overrides) -> PicoGPTConfig:
    values = dict(vocab_size=65, block_size=BLOCK_SIZE, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)
    values.update(overrides)
    return PicoGPTConfig(**values)


def tiny_datamodule(corpus_path, batch_size: int, train_samples: int = 256) -> TinyShakespeareDataModule:
    return TinyShakespeareDataModule(
        data_path=str(corpus_path),
        block_size=BLOCK_SIZE,
        batch_size=batch_size,
        train_samples=train_samples,
        val_samples=8,
        seed=SEED,
    )


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer that trains only: no validation, logger, checkpoints or progress bar."""
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return L.Trainer(**options)


class LossRecorder(L.Callback):
    """The loss of every micro-batch, averaged over ranks.

    Lightning reports a micro-batch's loss divided by accumulate_grad_batches, so the loss of
    one optimizer step's global batch is the sum over its micro-batches (see `step_losses`).
    """

    def __init__(self):
        self.losses: List[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses.append(float(loss))


def seed_everything() -> None:
    L.seed_everything(SEED, workers=True, verbose=False)


def step_losses(micro_losses: List[float], accumulate: int) -> List[float]:
    return [sum(micro_losses[i : i + accumulate]) for i in range(0, len(micro_losses), accumulate)]
