"""Prompt/completion data through Hugging Face `datasets`: preference pairs for DPO, instructions for SFT.

Columns follow trl: `prompt`, `chosen`, `rejected` (PreferenceDataModule) and `prompt`,
`completion` (InstructionDataModule). Data comes from a JSONL file or any `datasets`
path/hub id; with none given, pairs are derived from tiny_shakespeare so the recipes run
offline (see `shakespeare_pairs`). Texts are tokenized once with `Dataset.map` (cached
beside a file's Arrow cache) and padded per batch with PadCollator's semantics: labels are
pre-shifted and -100 on the prompt and the padding, so only completion tokens are learnt.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from picogpt_lightning.data.collate import IGNORE_INDEX, PadCollator
from picogpt_lightning.data.shakespeare import split_point, speech_spans
from picogpt_lightning.data.source import find_corpus
from picogpt_lightning.data.tokenizer import Tokenizer, build_tokenizer

INDEX_COLUMN = "index"  # each example's position across splits: DPO looks up precomputed reference log-probs by it


def shakespeare_pairs(
    text: str, split: str, val_fraction: float = 0.1, prompt_chars: int = 32, completion_chars: int = 32, seed: int = 0,
    rejected_per_prompt: int = 1, prompts_per_speech: int = 1,
) -> list[dict]:
    """Preference pairs from the speeches of one split of the corpus, deterministic given `seed`.

    prompt = a speech's opening `prompt_chars` characters (speaker name included), chosen = its
    next `completion_chars` characters, rejected = the same stretch of another speech of similar
    length: plausible Shakespeare that does not continue this prompt. A speech belongs to the
    split its first character is in, as in TinyShakespeareDataModule's speeches mode, and a
    rejected continuation comes from the same split, so validation pairs never see training text.
    `rejected_per_prompt` > 1 pairs each prompt with that many rejected continuations, from the
    speeches nearest to it in length (one pair each): more, more varied pairs from the same speeches.
    `prompts_per_speech` > 1 also cuts each speech's opening shorter, `completion_chars` at a time
    (its first prompt_chars, prompt_chars - completion_chars, ... characters), each a prompt with
    the next `completion_chars` as chosen and the same stretch of the rejected speeches.
    """
    shortest = prompt_chars - (prompts_per_speech - 1) * completion_chars
    if shortest < 1:
        raise ValueError(
            f"prompts_per_speech {prompts_per_speech} would cut prompts to {shortest} characters; each prompt is "
            f"completion_chars ({completion_chars}) shorter than the last: need prompts_per_speech <= "
            f"{(prompt_chars - 1) // completion_chars + 1}"
        )
    cut = split_point(text, val_fraction)
    need = prompt_chars + completion_chars
    spans = [(a, b) for a, b in speech_spans(text) if (a < cut) == (split == "train") and b - a >= need]
    if len(spans) < rejected_per_prompt + 1:
        raise ValueError(
            f"the {split} split has {len(spans)} speech(es) of >= {need} characters, {rejected_per_prompt} rejected "
            f"per prompt need {rejected_per_prompt + 1}; lower prompt_chars/completion_chars/rejected_per_prompt "
            "or use a longer corpus"
        )
    by_length = sorted(spans, key=lambda span: (span[1] - span[0], span[0]))
    rng = random.Random(seed)
    pairs = []  # (start, pair), to return the pairs in corpus order
    for rank, (start, _) in enumerate(by_length):
        others = [by_length[other][0] for other in nearest_ranks(rank, len(by_length), rejected_per_prompt, rng)]
        for length in range(prompt_chars, shortest - 1, -completion_chars):
            end = length + completion_chars
            for other_start in others:
                pair = {
                    "prompt": text[start : start + length],
                    "chosen": text[start + length : start + end],
                    "rejected": text[other_start + length : other_start + end],
                }
                pairs.append((start, pair))
    return [pair for _, pair in sorted(pairs, key=lambda item: item[0])]


def nearest_ranks(rank: int, count: int, k: int, rng: random.Random) -> list[int]:
    """The k ranks nearest to `rank` in 0..count-1 (itself excluded), nearer first; of two at the
    same distance when only one is still needed, a random one. Neighbours in length order are
    speeches alike in length."""
    ranks, distance = [], 1
    while len(ranks) < k:
        sides = [other for other in (rank - distance, rank + distance) if 0 <= other < count]
        if len(sides) > k - len(ranks):
            sides = [rng.choice(sides)]
        ranks += sides
        distance += 1
    return ranks


def truncate(prompt: list[int], completions: Sequence[list[int]], max_length: int, max_prompt_length: int):
    """trl's rule: if prompt + longest completion exceeds max_length, keep the prompt's last
    max_prompt_length tokens (the ones next to the completion); then cut completions to fit."""
    longest = max(len(completion) for completion in completions)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, [completion[:room] for completion in completions]


def tokenize(batch: dict, tokenizer: Tokenizer, completion_columns: Sequence[str], max_length: int,
             max_prompt_length: int) -> dict:
    """`Dataset.map` function: token ids of the prompt and of each completion, truncated to max_length.
    A plain function of its arguments, so `datasets` can fingerprint it and reuse its cache."""
    prompts = tokenizer.encode_batch(batch["prompt"])
    encoded = {column: tokenizer.encode_batch(batch[column]) for column in completion_columns}
    out = {f"{column}_ids": [] for column in ("prompt", *completion_columns)}
    for i, prompt in enumerate(prompts):
        prompt, completions = truncate(prompt, [encoded[column][i] for column in completion_columns],
                                       max_length, max_prompt_length)
        out["prompt_ids"].append(prompt)
        for column, completion in zip(completion_columns, completions):
            out[f"{column}_ids"].append(completion)
    return out


class PromptCompletionCollator:
    """Batches {prompt_ids, <completion>_ids...} samples: each completion is appended to its prompt
    and the sequences are padded by PadCollator; labels that would predict a prompt token are -100.

    For preference data (completions "chosen", "rejected") the batch stacks every chosen
    sequence, then every rejected one: one forward pass over 2B rows scores both.
    """

    def __init__(self, completions: Sequence[str], pad_token_id: int | None = 0):
        self.completions = tuple(completions)
        self.pad = PadCollator(pad_token_id=pad_token_id)

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences, prompt_lengths = [], []
        for column in self.completions:
            for sample in samples:
                sequences.append(list(sample["prompt_ids"]) + list(sample[f"{column}_ids"]))
                prompt_lengths.append(len(sample["prompt_ids"]))
        batch = self.pad(sequences)
        # labels[t] is token t + 1, so the first len(prompt) - 1 labels are prompt tokens
        positions = torch.arange(batch["labels"].shape[1])
        prompt_labels = positions < torch.tensor(prompt_lengths)[:, None] - 1
        batch["labels"] = batch["labels"].masked_fill(prompt_labels, IGNORE_INDEX)
        if INDEX_COLUMN in samples[0]:
            batch[INDEX_COLUMN] = torch.tensor([sample[INDEX_COLUMN] for sample in samples], dtype=torch.long)
        return batch


class PromptCompletionDataModule(L.LightningDataModule):
    """Shared by the preference and instruction data modules; subclasses name their columns.

    Args:
        data_path: a JSONL file, or any `datasets` path / hub id (`datasets.load_dataset`);
            None derives pairs from tiny_shakespeare (found as TinyShakespeareDataModule finds it).
        val_data_path: validation data in the same form; None splits `val_fraction` off data_path.
        tokenizer: None takes the tokenizer of the model being trained (the checkpoint it starts
            from); else 'char' (from the corpus), a .ckpt of this project, or a HF path / hub id.
        max_length: most tokens of prompt + completion; None: the model's block_size + 1, all it reads.
        max_prompt_length: what a prompt is cut to (its last tokens) when a sample is too long;
            None: half of max_length.
        corpus_path, prompt_chars, completion_chars: the tiny_shakespeare corpus and the size of
            the pairs derived from it when data_path is None.
        rejected_per_prompt: rejected continuations per training prompt of the derived pairs (one
            pair each, from different speeches); prompts_per_speech: openings per speech, each
            completion_chars shorter than the last (shakespeare_pairs). Validation pairs keep one of each.
        cache_dir: where `datasets` keeps its Arrow files (None: its default, ~/.cache/huggingface).
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
        for name, value in [("batch_size", batch_size), ("prompt_chars", prompt_chars), ("completion_chars", completion_chars),
                            ("rejected_per_prompt", rejected_per_prompt), ("prompts_per_speech", prompts_per_speech)]:
            _require_positive_int(name, value)
        for name, value in [("max_length", max_length), ("max_prompt_length", max_prompt_length)]:
            if value is not None:
                _require_positive_int(name, value)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) to leave room for a completion"
            )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
        if data_path is None and val_data_path is not None:
            raise ValueError("val_data_path needs data_path too; leave both unset to derive pairs from tiny_shakespeare")
        self.save_hyperparameters()
        self._tokenizer: Tokenizer | None = None
        self.train_dataset = None
        self.val_dataset = None

    # ---- the tokenizer --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            kind = self.hparams.tokenizer
            if kind is None:
                self._tokenizer = self._model_tokenizer()
            elif kind == "char":
                self._tokenizer = build_tokenizer("char", text=self._corpus())
            else:
                self._tokenizer = build_tokenizer(kind)
        return self._tokenizer

    def _model_tokenizer(self) -> Tokenizer:
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "data tokenizer is unset and the model has none: start the model from a checkpoint with a "
                "tokenizer (init_from), or set data tokenizer to 'char', a .ckpt or a Hugging Face tokenizer"
            )
        return tokenizer

    # ---- building the datasets --------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, val = self._load_splits()
        max_length, max_prompt_length = self._lengths()
        columns = ("prompt",) + self.completion_columns
        options = dict(tokenizer=self.tokenizer, completion_columns=self.completion_columns,
                       max_length=max_length, max_prompt_length=max_prompt_length)

        # one index across both splits, so a table of precomputed values can hold the two
        train = train.add_column(INDEX_COLUMN, list(range(len(train))))
        val = val.add_column(INDEX_COLUMN, list(range(len(train), len(train) + len(val))))
        keep = [f"{column}_ids" for column in columns] + [INDEX_COLUMN]
        self.train_dataset, self.val_dataset = (
            split.map(tokenize, batched=True, fn_kwargs=options, remove_columns=[c for c in split.column_names if c != INDEX_COLUMN])
            .select_columns(keep)
            .with_format(None)
            for split in (train, val)
        )
        for name, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            self._check_nonempty(dataset, name)

    def _lengths(self) -> tuple[int, int]:
        max_length = self.hparams.max_length
        module = self.trainer.lightning_module if self.trainer is not None else None
        block_size = getattr(getattr(module, "config", None), "block_size", None)
        if max_length is None:
            if block_size is None:
                raise ValueError("max_length is unset and there is no model to take block_size + 1 from; set max_length")
            max_length = block_size + 1
        elif block_size is not None and max_length > block_size + 1:
            raise ValueError(
                f"max_length {max_length} exceeds what the model reads (block_size {block_size} + 1); "
                f"set max_length <= {block_size + 1}"
            )
        max_prompt_length = self.hparams.max_prompt_length or max_length // 2
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
        return max_length, max_prompt_length

    def _load_splits(self):
        from datasets import Dataset

        path = self.hparams.data_path
        if path is None:
            text, options = self._corpus(), self._pair_options()
            # validation keeps one pair per speech: the held-out pairs do not depend on the training knobs
            more = dict(rejected_per_prompt=self.hparams.rejected_per_prompt, prompts_per_speech=self.hparams.prompts_per_speech)
            return tuple(
                Dataset.from_list(self.from_pairs(shakespeare_pairs(text, split, **options, **knobs)))
                for split, knobs in (("train", more), ("val", {}))
            )
        data = self._load(path)
        if self.hparams.val_data_path is not None:
            return data, self._load(self.hparams.val_data_path)
        if len(data) < 2:
            raise ValueError(f"{path} holds {len(data)} example(s); a train/val split needs at least 2, or pass val_data_path")
        split = data.train_test_split(test_size=self.hparams.val_fraction, seed=self.hparams.seed)
        return split["train"], split["test"]

    def _pair_options(self) -> dict:
        hp = self.hparams
        return dict(val_fraction=hp.val_fraction, prompt_chars=hp.prompt_chars, completion_chars=hp.completion_chars, seed=hp.seed)

    @staticmethod
    def from_pairs(pairs: list[dict]) -> list[dict]:
        """The derived preference pairs in this module's columns."""
        return pairs

    def _load(self, path: str):
        """A `datasets.Dataset` of the required columns from a JSONL file or a `datasets` path / hub id."""
        import datasets

        required = ("prompt",) + self.completion_columns
        is_jsonl = path.endswith((".jsonl", ".json"))
        if is_jsonl:
            check_jsonl(path, required)
        try:
            if is_jsonl:
                data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=self.hparams.cache_dir)
            else:
                data = datasets.load_dataset(path, split="train", cache_dir=self.hparams.cache_dir)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds for "cannot read this"
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"cannot load data {path!r} ({reason}); pass a JSONL file or a `datasets` path / hub id") from None
        missing = [column for column in required if column not in data.column_names]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {missing}; each example needs {list(required)} (it has {data.column_names})"
            )
        return data

    def _corpus(self) -> str:
        path = find_corpus(self.hparams.corpus_path)
        return path.read_text(encoding="utf-8")

    @staticmethod
    def _check_nonempty(dataset, split: str) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {split} split is empty; give more examples or a smaller val_fraction")

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

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            collate_fn=self.collator(),
            num_workers=workers,
            persistent_workers=workers > 0,
            **kwargs,
        )

    @staticmethod
    def _require(dataset, split: str):
        if dataset is None:
            raise RuntimeError(f"the {split} dataset is not built yet; call setup() first (the Trainer does it)")
        return dataset


class PreferenceDataModule(PromptCompletionDataModule):
    """prompt / chosen / rejected pairs for DPO; batches hold every chosen row, then every rejected row."""

    completion_columns = ("chosen", "rejected")


class InstructionDataModule(PromptCompletionDataModule):
    """prompt / completion pairs for supervised fine-tuning; with no data, a speech's opening and its
    true continuation (the chosen side of the derived preference pairs)."""

    completion_columns = ("completion",)

    @staticmethod
    def from_pairs(pairs: list[dict]) -> list[dict]:
        # once per prompt, however many rejected continuations it was paired with
        return list({(pair["prompt"], pair["chosen"]): {"prompt": pair["prompt"], "completion": pair["chosen"]}
                     for pair in pairs}.values())


def check_jsonl(path: str, columns: Sequence[str]) -> None:
    """One-line errors for the usual mistakes, before `datasets` turns them into long tracebacks."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}; check the path")
    with open(path, encoding="utf-8") as file:
        lines = [(number, line) for number, line in enumerate(file, 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty; write one JSON object per line with the keys {list(columns)}")
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} holds a {type(record).__name__}, not a JSON object")
        missing = [column for column in columns if not isinstance(record.get(column), str)]
        if missing:
            raise ValueError(f"{path} line {number} lacks the text column(s) {missing}; every line needs {list(columns)}")


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
