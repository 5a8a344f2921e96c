"""Tiny Shakespeare as a LightningDataModule: nanoGPT's random windows, or one sample per speech.

The corpus is tokenized once into a token store in the cache (data/cached_store.py), which
later runs open instead of tokenizing again. Everything here is a plain map-style dataset. The train loader's sampler (data/samplers.py) shards
it across DDP ranks itself, so Lightning keeps it instead of injecting a DistributedSampler, and
can resume part-way through an epoch: an interrupted run continues with the very batches it would
have seen (the position travels in checkpoints through ``state_dict``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from picogpt_lightning.data.base import (
    MAX_VAL_WINDOWS, PicoGPTDataModule, check_block_size, require_loader_options, require_positive_int,
)
from picogpt_lightning.data.cached_store import cached_store
from picogpt_lightning.data.collate import PadCollator
from picogpt_lightning.data.samplers import LengthGroupedSampler, ResumableSampler
from picogpt_lightning.corpus import TokenStore
from picogpt_lightning.data.source import read_corpus
from picogpt_lightning.data.splits import speech_spans, split_point
from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer

MODES = ("blocks", "speeches")


class TokenWindows(Dataset):
    """nanoGPT's batches as a dataset: windows of block_size + 1 tokens at random offsets.

    The offsets are drawn once from ``generator``, so an epoch is a fixed set of windows that the
    sampler orders, and every DDP rank agrees on them. ``tokens`` is a split of the token store,
    memory-mapped: a window is copied out of it when fetched.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, num_samples: int, generator: torch.Generator):
        if len(tokens) < block_size + 1:
            raise UserError(
                f"a split of {len(tokens)} tokens cannot hold one window of block_size + 1 = {block_size + 1}; "
                "lower block_size or use a longer corpus"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.offsets = torch.randint(len(tokens) - block_size, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        """A whole batch of windows as one (batch, block_size + 1) tensor, gathered by one indexing op.

        torch's DataLoader calls this, when a dataset has it, instead of one __getitem__ per sample.
        """
        starts = self.offsets[torch.as_tensor(indices, dtype=torch.long)].numpy()
        return torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64))

    @property
    def lengths(self) -> list[int]:
        return [self.block_size + 1] * len(self)


class TokenSequences(Dataset):
    """Variable-length samples, one tensor of token ids each."""

    def __init__(self, sequences: Sequence[torch.Tensor]):
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sequences[index]

    @property
    def lengths(self) -> list[int]:
        return [len(sequence) for sequence in self.sequences]


class TinyShakespeareDataModule(PicoGPTDataModule):
    """Tiny Shakespeare for language modelling, with a char, BPE or Hugging Face tokenizer.

    ``mode="blocks"``: windows of ``block_size + 1`` tokens at random offsets, exactly nanoGPT's data.
    ``mode="speeches"``: one sample per speaker turn, truncated to ``block_size + 1`` tokens and padded
    per batch, to a multiple of ``pad_to_multiple_of`` (default 64, at most ``block_size``) so that a
    compiled model sees a few widths, not one per batch. The first ``1 - val_fraction`` of the
    characters train; in speeches mode a turn that crosses that point trains whole, so no speech is
    cut in two.
    """

    def __init__(
        self,
        data_path: str | None = None,
        tokenizer: str | None = "char",
        vocab_size: int | None = None,
        block_size: int | None = 256,
        batch_size: int = 64,
        mode: str = "blocks",
        train_samples: int | None = None,
        val_samples: int | None = None,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = 64,
        num_workers: int = 0,
        seed: int = 1337,
        val_fraction: float = 0.1,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {mode!r}")
        if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer):
            raise UserError(f"tokenizer must be 'char', 'bpe', a checkpoint or a Hugging Face path/id, or None "
                            f"(the model's), got {tokenizer!r}")
        if tokenizer == "bpe" and vocab_size is None:
            raise UserError("tokenizer='bpe' needs vocab_size (e.g. vocab_size=512) to train to")
        if tokenizer != "bpe" and vocab_size is not None:
            raise UserError(f"vocab_size applies only to tokenizer='bpe'; the {tokenizer!r} vocabulary is fixed")
        require_positive_int("block_size", block_size, optional=True)
        for name, value in [("train_samples", train_samples), ("val_samples", val_samples),
                            ("pad_to_multiple_of", pad_to_multiple_of)]:
            require_positive_int(name, value, optional=True)
        require_loader_options(batch_size, num_workers, val_fraction)
        self.save_hyperparameters()

        self._text: str | None = None
        self._store: TokenStore | None = None
        self._model_tokenizer: Tokenizer | None = None  # tokenizer=None: the trained model's (connect_model)
        self._model_block_size: int | None = None
        self._stage: str | None = None
        self.train_dataset: TokenWindows | TokenSequences | None = None
        self.val_dataset: TokenWindows | TokenSequences | None = None

    @property
    def text(self) -> str:
        """The whole corpus, read on first use."""
        if self._text is None:
            self._text = read_corpus(self.hparams.data_path, cache_dir=self.hparams.cache_dir)
        return self._text

    @property
    def split_index(self) -> int:
        return split_point(self.text, self.hparams.val_fraction)

    @property
    def store(self) -> TokenStore:
        """The corpus tokenized once into the cache (data/cached_store.py), opened on first use."""
        if self._store is None:
            hparams = self.hparams
            tokenizer = hparams.tokenizer or self._model_tokenizer
            if tokenizer is None:
                raise UserError(
                    "data tokenizer is None (the model's) but the model has none yet: start it from a checkpoint "
                    "(model init_from), or set data tokenizer to 'char', 'bpe' or a tokenizer path"
                )
            self._store = cached_store(hparams.data_path, tokenizer, hparams.vocab_size, hparams.val_fraction,
                                       cache_dir=hparams.cache_dir)
        return self._store

    @property
    def tokenizer(self) -> Tokenizer:
        """The store's, read on first use, so LightningCLI can read ``vocab_size`` right after ``__init__``."""
        return self.store.tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size. Absent while a tokenizer to come from the model is not handed over yet, so the
        command line's link from it to the model's vocab_size leaves the model's own (init_from's) alone."""
        if self.hparams.tokenizer is None and self._model_tokenizer is None:
            raise AttributeError("vocab_size: the tokenizer comes from the model (tokenizer=None)")
        return self.tokenizer.vocab_size

    @property
    def block_size(self) -> int:
        """Tokens a sample's model input holds: the one given, else the model's."""
        block_size = self.hparams.block_size or self._model_block_size
        if block_size is None:
            raise UserError("data block_size is None (the model's) but no model handed one over; set data block_size")
        return block_size

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def connect_model(self, tokenizer: Tokenizer | None, block_size: int | None) -> None:
        self._model_tokenizer, self._model_block_size = tokenizer, block_size
        if self.hparams.block_size is not None:
            check_block_size(self.hparams.block_size, block_size)
        self.setup(self._stage)  # what waited for the model is built now

    def prepare_data(self) -> None:
        if self.hparams.tokenizer is not None:
            self.store  # download and tokenize once, on one process per node

    def setup(self, stage: str | None = None) -> None:
        self._stage = stage
        if self.hparams.tokenizer is None and self._model_tokenizer is None:
            return  # built once the model hands its tokenizer over (connect_model)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_dataset("train")
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            self.val_dataset = self._build_dataset("val")

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "train")
        # the sampler takes this rank's share itself; being a DistributedSampler, Lightning keeps it under DDP
        seed, batch_size = self.hparams.seed, self.hparams.batch_size
        if self.hparams.group_by_length:
            sampler = LengthGroupedSampler(dataset.lengths, batch_size, seed=seed, **self._shard())
        else:
            sampler = ResumableSampler(dataset, seed=seed, **self._shard())
        return self._loader(dataset, sampler=self._resumable(sampler))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset, "val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()  # tiny_shakespeare has no separate test split

    def _build_dataset(self, split: str) -> TokenWindows | TokenSequences:
        if self.hparams.mode == "blocks":
            return self._windows(split)
        return self._speeches(split)

    def _windows(self, split: str) -> TokenWindows:
        tokens = self.store.tokens(split)
        block_size = self.block_size
        if split == "train":
            num_samples = self.hparams.train_samples or max(1, len(tokens) // block_size)
            seed = self.hparams.seed
        else:
            num_samples = self.hparams.val_samples or min(MAX_VAL_WINDOWS, max(1, len(tokens) - block_size))
            seed = self.hparams.seed + 1  # its own stream, so building val alone gives the same windows
        return TokenWindows(tokens, block_size, num_samples, torch.Generator().manual_seed(seed))

    def _speeches(self, split: str) -> TokenSequences:
        cut = self.split_index
        spans = speech_spans(self.text)
        # A turn belongs to the split its first character is in.
        spans = [s for s in spans if s[0] < cut] if split == "train" else [s for s in spans if s[0] >= cut]
        encoded = self.tokenizer.encode_batch([self.text[start:end] for start, end in spans])
        limit = self.block_size + 1
        sequences = [torch.tensor(ids[:limit], dtype=torch.long) for ids in encoded if len(ids) >= 2]
        dataset = TokenSequences(sequences)
        if len(dataset) == 0:
            raise UserError(f"the {split} split has no speech of 2 or more tokens; check the corpus and val_fraction")
        return dataset

    def collator(self) -> PadCollator:
        # blocks-mode windows all have block_size tokens; only speeches are bucketed
        multiple = self.hparams.pad_to_multiple_of if self.hparams.mode == "speeches" else None
        return PadCollator(self.pad_token_id, pad_to_multiple_of=multiple, max_length=self.block_size)
