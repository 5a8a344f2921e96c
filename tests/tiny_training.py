"""A tiny model, its data and a quiet CPU trainer, shared by the scaling tests and tests/ddp_run.py."""

from typing import List

import lightning as L
import torch
from torch.utils.data import DataLoader

from picogpt_lightning.data import PadCollator, TinyShakespeareDataModule
from picogpt_lightning.data.collate import IGNORE_INDEX
from picogpt_lightning.model import PicoGPT, PicoGPTConfig
from picogpt_lightning.modules import DistillationModule, LanguageModelModule

import factories

SEED = 1337
BLOCK_SIZE = 32


def tiny_config(**overrides) -> PicoGPTConfig:
    return factories.tiny_config(**{"vocab_size": 65, "block_size": BLOCK_SIZE, **overrides})


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
    """The loss of every micro-batch: its mean over real tokens, averaged over ranks.

    A training step returns its micro-batch's loss sum (the base divides gradients by the
    step's token count later), and Lightning divides that by accumulate_grad_batches.
    """

    def __init__(self):
        self.losses: List[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = (batch["labels"] != IGNORE_INDEX).sum()
        loss = outputs["loss"].detach().float() * trainer.accumulate_grad_batches / tokens
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


def seed_everything() -> None:
    L.seed_everything(SEED, workers=True, verbose=False)


def step_losses(micro_losses: List[float], accumulate: int) -> List[float]:
    """Each optimizer step's loss: the mean of its micro-batches' (exact when they hold equal token counts)."""
    return [sum(micro_losses[i : i + accumulate]) / accumulate for i in range(0, len(micro_losses), accumulate)]


# ---- token weighting: one plain SGD step over micro-batches of different real-token counts ----

SGD_LR = 1.0  # large, so a wrongly weighted gradient moves the weights far more than rounding does


class PlainSGD:
    """Mixed into a module: SGD without momentum, so the step's change is exactly -lr * gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=SGD_LR)


class SGDLanguageModel(PlainSGD, LanguageModelModule):
    pass


class SGDDistillation(PlainSGD, DistillationModule):
    pass


def uneven_sequences(vocab_size: int = 65) -> List[List[List[int]]]:
    """Four micro-batches of token lists (a sample of L+1 ids gives L labels): 19, 3, 30 and 8 real tokens."""
    generator = torch.Generator().manual_seed(SEED)
    lengths = [[13, 8], [4], [11, 11, 11], [9]]
    return [[torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in batch] for batch in lengths]


def collate(samples) -> dict:
    return PadCollator(pad_token_id=0)(samples)


class FixedBatches(L.LightningDataModule):
    """Hands rank r the micro-batches per_rank[r], in order (no sampler, no shuffling)."""

    def __init__(self, per_rank: List[List[dict]]):
        super().__init__()
        self.per_rank = per_rank

    def train_dataloader(self):
        return DataLoader(self.per_rank[self.trainer.global_rank], batch_size=None)


def one_sgd_step(module, per_rank: List[List[dict]], accumulate: int, devices: int = 1) -> L.Trainer:
    trainer = quiet_trainer(
        max_steps=1, accumulate_grad_batches=accumulate, devices=devices,
        strategy="ddp" if devices > 1 else "auto", use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=FixedBatches(per_rank))
    return trainer


def tiny_teacher(path: str, vocab_size: int = 65) -> str:
    """A PicoGPT teacher saved to `path`, deeper and wider than tiny_config."""
    torch.manual_seed(SEED + 1)
    PicoGPT(tiny_config(vocab_size=vocab_size, n_layer=4, n_embd=48, n_head=4, n_query_groups=2)).save(path)
    return path


def distillation_module(teacher: str) -> "SGDDistillation":
    seed_everything()
    return SGDDistillation(tiny_config(), teacher=teacher, alpha_ce=0.3, alpha_kd=0.6, alpha_cos=0.1, temperature=2.0)
