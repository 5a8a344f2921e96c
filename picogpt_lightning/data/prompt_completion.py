"""Prompt/completion data through Hugging Face `datasets`: preference pairs for DPO, instructions for SFT.

Columns follow trl: `prompt`, `chosen`, `rejected` (PreferenceDataModule) and `prompt`,
`completion` or `messages` (InstructionDataModule), as text or as conversations (lists of
{role, content} messages) rendered through the tokenizer's chat template (data/conversations.py).
Every completion ends with the tokenizer's EOS, so the model learns to stop. Data comes from a JSONL file or any `datasets`
path/hub id; with none given, pairs are derived from tiny_shakespeare so the recipes run
offline (data/pairs.py). Texts are tokenized once with `Dataset.map` (cached beside a file's
Arrow cache) and padded per batch by PromptCompletionCollator: labels are pre-shifted and -100
on the prompt and the padding, so only completion tokens are learnt.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader

from picogpt_lightning.data.base import PicoGPTDataModule, require_loader_options, require_positive_int
from picogpt_lightning.data.collate import INDEX_COLUMN, PromptCompletionCollator
from picogpt_lightning.data.conversations import MESSAGES
from picogpt_lightning.data.jsonl import check_jsonl
from picogpt_lightning.data.pairs import shakespeare_pairs
from picogpt_lightning.data.source import read_corpus
from picogpt_lightning.data.truncate import tokenize
from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer


@contextmanager
def no_datasets_progress_bars():
    """Tokenizing takes a second or two: datasets' "Map:" bars, one per split run together on one
    line, would only bury the training's own output. The user's own setting returns afterwards."""
    import datasets

    disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not disabled:
            datasets.enable_progress_bars()


class PromptCompletionDataModule(PicoGPTDataModule):
    """Shared by the preference and instruction data modules; subclasses name their columns.

    Args:
        data_path: a JSONL file, or any `datasets` path / hub id (`datasets.load_dataset`);
            None derives pairs from tiny_shakespeare (found as TinyShakespeareDataModule finds it).
        val_data_path: validation data in the same form; None splits `val_fraction` off data_path.
        tokenizer: None takes the tokenizer of the model being trained (the checkpoint it starts
            from, given by `connect_model`); else 'char' (from the corpus), a .ckpt of this project,
            or a HF path / hub id.
        max_length: most tokens of prompt + completion; None: the model's block_size + 1, all it reads.
        max_prompt_length: what a prompt is cut to (its last tokens) when a sample is too long;
            None: half of max_length.
        corpus_path, prompt_chars, completion_chars: the tiny_shakespeare corpus and the size of
            the pairs derived from it when data_path is None.
        rejected_per_prompt: rejected continuations per training prompt of the derived pairs (one
            pair each, from different speeches); prompts_per_speech: openings per speech, each
            completion_chars shorter than the last (shakespeare_pairs). Validation pairs keep one of each.
        cache_dir: where `datasets` keeps its Arrow files (None: its default, ~/.cache/huggingface).

    `setup` reads and checks the examples; they are tokenized on first use (`train_dataset`, the
    loaders), after the model being trained has lent its tokenizer and block_size (`connect_model`).
    """

    completion_columns: tuple[str, ...] = ()

    def __init__(
        self,
        data_path: str | None = None,
        val_data_path: str | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        corpus_path: str | None = None,
        prompt_chars: int = 32,
        completion_chars: int = 32,
        rejected_per_prompt: int = 1,
        prompts_per_speech: int = 1,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str | None = None,
    ):
        super().__init__()
        for name, value in [("prompt_chars", prompt_chars), ("completion_chars", completion_chars),
                            ("rejected_per_prompt", rejected_per_prompt), ("prompts_per_speech", prompts_per_speech)]:
            require_positive_int(name, value)
        for name, value in [("max_length", max_length), ("max_prompt_length", max_prompt_length)]:
            require_positive_int(name, value, optional=True)
        if max_length is not None and max_length < 2:
            raise UserError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise UserError(
                f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) to leave room for a completion"
            )
        require_loader_options(batch_size, num_workers, val_fraction)
        if data_path is None and val_data_path is not None:
            raise UserError("val_data_path needs data_path too; leave both unset to derive pairs from tiny_shakespeare")
        self.save_hyperparameters()
        self._tokenizer: Tokenizer | None = None
        self._text: str | None = None
        self._model_tokenizer: Tokenizer | None = None
        self._model_block_size: int | None = None
        self._examples = None  # (train, val) `datasets.Dataset`s of text, read by setup
        self._tokenized = None  # the same, tokenized, built on first use

    # ---- what the model lends ---------------------------------------------------------------

    def connect_model(self, tokenizer: Tokenizer | None, block_size: int | None) -> None:
        """The trained model's tokenizer (used when `tokenizer` is None) and block_size (max_length's
        default and bound). The model passes them in its `setup`; outside a Trainer, call it before use."""
        max_length = self.hparams.max_length
        if block_size is not None and max_length is not None and max_length > block_size + 1:
            raise UserError(
                f"max_length {max_length} exceeds what the model reads (block_size {block_size} + 1); "
                f"set max_length <= {block_size + 1}"
            )
        self._model_tokenizer, self._model_block_size = tokenizer, block_size

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            kind = self.hparams.tokenizer
            if kind is None:
                if self._model_tokenizer is None:
                    raise UserError(
                        "data tokenizer is unset and the model has none: start the model from a checkpoint with a "
                        "tokenizer (init_from), or set data tokenizer to 'char', a .ckpt or a Hugging Face tokenizer"
                    )
                self._tokenizer = self._model_tokenizer
            elif kind == "char":
                self._tokenizer = build_tokenizer("char", text=self._corpus())
            else:
                self._tokenizer = build_tokenizer(kind)
        return self._tokenizer

    def _lengths(self) -> tuple[int, int]:
        max_length, block_size = self.hparams.max_length, self._model_block_size
        if max_length is None:
            if block_size is None:
                raise UserError("max_length is unset and there is no model to take block_size + 1 from; set max_length")
            max_length = block_size + 1
        max_prompt_length = self.hparams.max_prompt_length or max_length // 2
        if max_prompt_length >= max_length:
            raise UserError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
        return max_length, max_prompt_length

    # ---- the datasets -------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._examples is None:
            self._examples = self._load_splits()

    @property
    def train_dataset(self):
        """The tokenized training split; None before `setup`."""
        return self._datasets()[0]

    @property
    def val_dataset(self):
        return self._datasets()[1]

    def _datasets(self) -> tuple:
        if self._tokenized is None and self._examples is not None:
            self._tokenized = self._tokenize(*self._examples)
        return self._tokenized or (None, None)

    def _tokenize(self, train, val) -> tuple:
        max_length, max_prompt_length = self._lengths()
        options = dict(tokenizer=self.tokenizer, completion_columns=self.completion_columns,
                       max_length=max_length, max_prompt_length=max_prompt_length)
        # one index across both splits, so a table of precomputed values can hold the two
        train = train.add_column(INDEX_COLUMN, list(range(len(train))))
        val = val.add_column(INDEX_COLUMN, list(range(len(train), len(train) + len(val))))
        keep = [f"{column}_ids" for column in ("prompt",) + self.completion_columns] + [INDEX_COLUMN]
        with no_datasets_progress_bars():
            splits = tuple(
                split.map(tokenize, batched=True, fn_kwargs=options, remove_columns=[c for c in split.column_names if c != INDEX_COLUMN])
                .select_columns(keep)
                .with_format(None)
                for split in (train, val)
            )
        for name, dataset in zip(("train", "val"), splits):
            if len(dataset) == 0:
                raise UserError(f"the {name} split is empty; give more examples or a smaller val_fraction")
            for column in self.completion_columns:  # no token to learn: a loss of 0 / 0, NaN, chosen as best
                if not any_tokens(dataset, f"{column}_ids"):
                    what = "completion" if column == "completion" else f"{column} completion"
                    raise UserError(
                        f"every {what} of the {name} split ({self._source(name)}) is empty after truncation to "
                        f"max_length {max_length}: there is no token to learn; give examples with non-empty {column} text"
                    )
        return splits

    def _source(self, split: str) -> str:
        """Where a split's examples come from, as the user gave it."""
        path = self.hparams.val_data_path if split == "val" and self.hparams.val_data_path else self.hparams.data_path
        return path or "the pairs derived from tiny_shakespeare"

    def _load_splits(self) -> tuple:
        from datasets import Dataset

        path = self.hparams.data_path
        if path is None:
            hp = self.hparams
            options = dict(val_fraction=hp.val_fraction, prompt_chars=hp.prompt_chars,
                           completion_chars=hp.completion_chars, seed=hp.seed)
            # validation keeps one pair per speech: the held-out pairs do not depend on the training knobs
            more = dict(rejected_per_prompt=hp.rejected_per_prompt, prompts_per_speech=hp.prompts_per_speech)
            return tuple(
                Dataset.from_list(self.from_pairs(shakespeare_pairs(self._corpus(), split, **options, **knobs)))
                for split, knobs in (("train", more), ("val", {}))
            )
        data = self._load(path)
        if self.hparams.val_data_path is not None:
            return data, self._load(self.hparams.val_data_path)
        if len(data) < 2:
            raise UserError(f"{path} holds {len(data)} example(s); a train/val split needs at least 2, or pass val_data_path")
        split = data.train_test_split(test_size=self.hparams.val_fraction, seed=self.hparams.seed)
        return split["train"], split["test"]

    @staticmethod
    def from_pairs(pairs: list[dict]) -> list[dict]:
        """The derived preference pairs in this module's columns."""
        return pairs

    def _load(self, path: str):
        """A `datasets.Dataset` of the required columns from a JSONL file or a `datasets` path / hub id."""
        import datasets

        formats = self.formats()
        is_jsonl = path.endswith((".jsonl", ".json"))
        if is_jsonl:
            check_jsonl(path, formats)
        try:
            if is_jsonl:
                data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=self.hparams.cache_dir)
            else:
                data = datasets.load_dataset(path, split="train", cache_dir=self.hparams.cache_dir)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds for "cannot read this"
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"cannot load data {path!r} ({reason}); pass a JSONL file or a `datasets` path / hub id") from None
        if not any(set(columns) <= set(data.column_names) for columns in formats):
            raise UserError(
                f"{path} lacks the columns of an example: it needs {' or '.join(map(str, map(list, formats)))} "
                f"(it has {data.column_names})"
            )
        return data

    @classmethod
    def formats(cls) -> list[tuple[str, ...]]:
        """The column sets an example may have, as trl names them (each text, or message lists)."""
        return [("prompt",) + cls.completion_columns]

    def _corpus(self) -> str:
        if self._text is None:  # read once, though the tokenizer and both splits use it
            self._text = read_corpus(self.hparams.corpus_path)
        return self._text

    # ---- loaders ----------------------------------------------------------------------------

    def collator(self) -> PromptCompletionCollator:
        return PromptCompletionCollator(self.completion_columns, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return self._loader(self._require(self.train_dataset, "train"), shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset, "val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def ordered_dataloaders(self) -> list[DataLoader]:
        """Every split in order, unshuffled: for values computed once per example (DPO's reference log-probs)."""
        return [self._loader(self._require(dataset, name), shuffle=False)
                for name, dataset in (("train", self.train_dataset), ("val", self.val_dataset))]


def any_tokens(dataset, column: str) -> bool:
    """Whether any example of `dataset` has a token in `column`; reads batches only until one has."""
    return any(len(ids) > 0 for batch in dataset.iter(batch_size=1024) for ids in batch[column])


class PreferenceDataModule(PromptCompletionDataModule):
    """prompt / chosen / rejected pairs for DPO; batches hold every chosen row, then every rejected row."""

    completion_columns = ("chosen", "rejected")


class InstructionDataModule(PromptCompletionDataModule):
    """prompt / completion pairs for supervised fine-tuning; with no data, a speech's opening and its
    true continuation (the chosen side of the derived preference pairs)."""

    completion_columns = ("completion",)

    @classmethod
    def formats(cls) -> list[tuple[str, ...]]:
        return [("prompt", "completion"), (MESSAGES,)]

    @staticmethod
    def from_pairs(pairs: list[dict]) -> list[dict]:
        # once per prompt, however many rejected continuations it was paired with
        return list({(pair["prompt"], pair["chosen"]): {"prompt": pair["prompt"], "completion": pair["chosen"]}
                     for pair in pairs}.values())
