"""TokenStoreDataModule: training on a token store (picogpt_lightning.corpus), the way nanoGPT reads OpenWebText.

Train windows are drawn fresh for every sample from a seeded generator (`mode="random"`,
nanoGPT's `get_batch`), or taken as packed chunks in order (`mode="sequential"`). Each sample
number of the run maps to its own window, so ranks (which take different numbers) see different
windows, and a run resumed mid-epoch continues with exactly the numbers, hence the batches, of
the uninterrupted run. Validation is a fixed set of windows spread evenly over the split. The
tokenizer, its vocabulary size and its special tokens come from the store, nowhere else.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from picogpt_lightning.corpus import TokenStore
from picogpt_lightning.data.base import (
    MAX_VAL_WINDOWS, PicoGPTDataModule, check_block_size, require_loader_options, require_positive_int,
)
from picogpt_lightning.data.collate import PadCollator
from picogpt_lightning.data.samplers import RunningSampler
from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer

MODES = ("random", "sequential")
GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood, 2014) on uint64 values: a counter becomes random bits."""
    z = values.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class StoreWindows(Dataset):
    """Windows of block_size + 1 tokens of one split; `draw` says where sample number n's window starts:
    "random" (uniform, from n and `seed`), "sequential" (chunk n, packed), "fixed" (n of len(self), evenly spread)."""

    def __init__(self, store: TokenStore, split: str, block_size: int, num_samples: int, draw: str, seed: int = 0):
        self.path, self.dtype, self.size = store.path / f"{split}.bin", store.dtype, store.num_tokens(split)
        self.window = block_size + 1
        if self.size < self.window:
            raise UserError(
                f"the store's {split} split holds {self.size} tokens, fewer than block_size + 1 = {self.window}; "
                "lower block_size or prepare more text"
            )
        self.num_samples, self.draw = num_samples, draw
        self.seed_bits = splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64))[0]  # any int seeds it

    def __len__(self) -> int:
        return self.num_samples

    def starts(self, numbers: np.ndarray) -> np.ndarray:
        if self.draw == "random":
            with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the generator means it to
                counters = (numbers.astype(np.uint64) + np.uint64(1)) * GOLDEN_GAMMA + self.seed_bits
            return (splitmix64(counters) % np.uint64(self.size - self.window + 1)).astype(np.int64)
        if self.draw == "sequential":
            return (numbers % (self.size // self.window)) * self.window
        return numbers * (self.size - self.window) // max(1, self.num_samples - 1)

    def __getitems__(self, numbers: Sequence[int]) -> torch.Tensor:
        """A batch of windows as one (batch, block_size + 1) tensor (torch's DataLoader asks for whole batches)."""
        starts = self.starts(np.asarray(numbers, dtype=np.int64))
        # mapped anew for every batch, as nanoGPT does: a long-lived map keeps every page it touched resident
        with open(self.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            self._read_ahead(mapped, starts)
            tokens = np.frombuffer(mapped, dtype=self.dtype)
            batch = tokens[starts[:, None] + np.arange(self.window)].astype(np.int64)
            del tokens  # the map closes only once no array looks into it
        return torch.from_numpy(batch)

    def _read_ahead(self, mapped: mmap.mmap, starts: np.ndarray) -> None:
        """Asks the kernel for every window's pages at once, so that a store larger than the page cache waits for
        one disk read per batch, not one per window (MADV_WILLNEED, where the platform has it)."""
        if not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
            return
        itemsize = self.dtype.itemsize
        for start in starts.tolist():
            first = start * itemsize // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_WILLNEED, first, (start + self.window) * itemsize - first)

    def __getitem__(self, number: int) -> torch.Tensor:
        return self.__getitems__([number])[0]


class TokenStoreDataModule(PicoGPTDataModule):
    """A token store made by `python -m picogpt_lightning prepare`, for language modelling at any corpus size.

    path: the store's directory. block_size: tokens a window trains on. mode: "random" (a fresh
    window per sample, nanoGPT's sampling) or "sequential" (packed block_size + 1 chunks in order).
    train_samples: windows an epoch counts (default: the train tokens over block_size); max_steps
    usually ends the run first. val_samples: the fixed validation windows (default: up to 2000).
    The store is checked when the module is built, so a missing or damaged one is one line at once.
    """

    def __init__(
        self,
        path: str,
        block_size: int = 256,
        batch_size: int = 64,
        mode: str = "random",
        train_samples: int | None = None,
        val_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
    ):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {mode!r}")
        require_positive_int("block_size", block_size)
        for name, value in [("train_samples", train_samples), ("val_samples", val_samples)]:
            require_positive_int(name, value, optional=True)
        require_loader_options(batch_size, num_workers)
        self.save_hyperparameters()
        self.store = TokenStore(path)
        self.train_dataset: StoreWindows | None = None
        self.val_dataset: StoreWindows | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.store.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.store.vocab_size

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def connect_model(self, tokenizer: Tokenizer | None, block_size: int | None) -> None:
        check_block_size(self.hparams.block_size, block_size)

    def setup(self, stage: str | None = None) -> None:
        block_size = self.hparams.block_size
        if stage in (None, "fit") and self.train_dataset is None:
            count = self.hparams.train_samples or max(1, self.store.num_tokens("train") // block_size)
            self.train_dataset = StoreWindows(self.store, "train", block_size, count, self.hparams.mode, self.hparams.seed)
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            positions = max(1, self.store.num_tokens("val") - block_size)
            count = self.hparams.val_samples or min(MAX_VAL_WINDOWS, positions)
            self.val_dataset = StoreWindows(self.store, "val", block_size, count, "fixed")

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "train")
        sampler = RunningSampler(dataset, seed=self.hparams.seed, **self._shard())
        return self._loader(dataset, sampler=self._resumable(sampler))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset, "val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()  # a store has two splits

    def collator(self) -> PadCollator:
        return PadCollator(self.pad_token_id, max_length=self.hparams.block_size)
