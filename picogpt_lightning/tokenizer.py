"""One tokenizer interface over three kinds: characters, a trained byte-level BPE, any HF tokenizer.

Every kind is backed by a transformers ``PreTrainedTokenizerFast``, so handing a model to the
Hugging Face ecosystem needs nothing more than ``Tokenizer.save``. Encoding and decoding call
its Rust backend (the `tokenizers` library) directly, and a tokenizer read from a checkpoint
builds the transformers object only when something asks for it: `generate` starts without
importing transformers' tokenizer stack.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from picogpt_lightning import checkpoints
from picogpt_lightning.errors import InputNotFound, UserError, first_line

EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB_SIZE = 256 + 1  # every byte, plus EOS_TOKEN
_KIND_KEY = "picogpt_kind"  # saved in tokenizer_config.json so load() knows the kind again


class Tokenizer:
    """Text <-> token ids, whatever the kind; ``hf`` is the underlying transformers tokenizer."""

    def __init__(self, kind: str, hf=None, backend: BackendTokenizer | None = None, special_tokens: dict | None = None):
        """From a transformers ``PreTrainedTokenizerFast`` (`hf`), or from its Rust `backend` and
        `special_tokens` ({"eos_token": "...", ...}), the transformers object then made when first used."""
        self.kind = kind
        self._hf = hf
        self.backend = hf.backend_tokenizer if hf is not None else backend
        self._special_tokens = dict(special_tokens or {})
        # encode() calls the Rust backend directly; like transformers does on each call that asks for
        # neither, turn off any truncation or padding a tokenizer.json may carry.
        self.backend.no_truncation()
        self.backend.no_padding()

    @property
    def hf(self):
        """The transformers tokenizer (a ``PreTrainedTokenizerFast``)."""
        if self._hf is None:
            self._hf = _wrap(self.backend, **self._special_tokens)
        return self._hf

    def _special_token_id(self, name: str) -> int | None:
        if self._hf is not None:
            return getattr(self._hf, f"{name}_id")
        token = self._special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(str(token))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        # counts added special tokens, which the model must embed too (as len() of the transformers one)
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_token_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_token_id("bos_token")

    def for_export(self) -> Tokenizer:
        """A copy with bos, eos and pad tokens, which transformers' batched generation and lm-eval expect.

        The tokenizer's own where it has them, else its eos for all three; a character
        vocabulary has none, and takes the newline (a line is the unit of text it ends),
        or its first symbol if it never saw one. The vocabulary and ids stay as they are.
        Padding goes on the left, where decoder-only generation needs it.
        """
        hf = copy.deepcopy(self.hf)
        fallback = hf.eos_token
        if fallback is None:
            symbols = hf.backend_tokenizer.get_vocab()
            fallback = "\n" if "\n" in symbols else min(symbols, key=symbols.get)
        for name in ("eos_token", "bos_token", "pad_token"):
            if getattr(hf, name) is None:
                setattr(hf, name, fallback)
        hf.padding_side = hf.init_kwargs["padding_side"] = "left"  # init_kwargs: what save_pretrained writes
        return Tokenizer(self.kind, hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts at once (the backend encodes them in parallel)."""
        # Plain ids need none of transformers' bookkeeping, which would double the time on a corpus,
        # nor the character offsets that `encode_batch_fast` (tokenizers >= 0.20.1) skips.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        try:
            encodings = encode(list(texts), add_special_tokens=False)
        except Exception as err:  # the Rust backend rejects unknown symbols without naming them
            raise self._encoding_error(texts, err) from err
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of ``ids`` with every token kept, so decode(encode(text)) == text for char and bpe."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise UserError(f"decode takes 1-D ids, got a tensor of shape {tuple(ids.shape)}; decode row by row")
            ids = ids.tolist()
        # what transformers' decode does with these flags, without its bookkeeping
        return self.backend.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict:
        """A JSON-able description that ``from_dict`` turns back into an identical tokenizer."""
        return {
            "kind": self.kind,
            "tokenizer_json": self.backend.to_str(),
            "special_tokens": dict(self._hf.special_tokens_map) if self._hf is not None else dict(self._special_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        if not isinstance(d, dict):
            raise UserError(f"Tokenizer.from_dict takes the dict made by to_dict(), got {type(d).__name__}")
        missing = [key for key in ("kind", "tokenizer_json", "special_tokens") if key not in d]
        if missing:
            raise UserError(f"tokenizer dict lacks {missing}; pass a dict made by Tokenizer.to_dict()")
        return cls(d["kind"], backend=BackendTokenizer.from_str(d["tokenizer_json"]), special_tokens=d["special_tokens"])

    def save(self, directory: str | os.PathLike) -> None:
        """Write Hugging Face files, so ``AutoTokenizer.from_pretrained(directory)`` loads them too."""
        self.hf.init_kwargs[_KIND_KEY] = self.kind
        self.hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        if not Path(directory).is_dir():
            raise InputNotFound(f"tokenizer directory {directory} does not exist; pass one written by save()")
        hf = _load_pretrained(str(directory))
        return cls(hf.init_kwargs.get(_KIND_KEY, str(directory)), hf)

    @classmethod
    def from_checkpoint(cls, path) -> Tokenizer:
        """The tokenizer a picogpt_lightning module stored in its checkpoint (a path or a `checkpoints.Checkpoint`)."""
        return cls.from_dict(checkpoints.load(path).require_tokenizer_dict())

    def _encoding_error(self, texts: list[str], err: Exception) -> UserError:
        vocab = self.backend.get_vocab()
        unknown = sorted({char for text in texts for char in text} - vocab.keys())
        if unknown and all(len(token) == 1 or token == EOS_TOKEN for token in vocab):  # a character vocabulary
            return UserError(
                f"character(s) {', '.join(map(repr, unknown[:5]))} not in the {self.kind!r} tokenizer's "
                f"{len(vocab)}-symbol vocabulary; build the char tokenizer from text that contains them"
            )
        return UserError(f"the {self.kind!r} tokenizer cannot encode this text: {first_line(err)}")


def build_tokenizer(kind: str, text: str | None = None, vocab_size: int | None = None) -> Tokenizer:
    """'char' (vocabulary = the characters of ``text``), 'bpe' (trained on ``text``), or an HF path/hub id."""
    if not isinstance(kind, str) or not kind:
        raise UserError(f"tokenizer kind must be 'char', 'bpe' or a Hugging Face path/id, got {kind!r}")
    if kind != "bpe" and vocab_size is not None:
        raise UserError(f"vocab_size applies only to the 'bpe' tokenizer, the {kind!r} vocabulary is fixed; drop it")
    if kind == "char":
        return char_tokenizer(set(_require_text(text, kind)))
    if kind == "bpe":
        return train_bpe([_require_text(text, kind)], vocab_size)
    return load_tokenizer(kind)  # text is not needed: the vocabulary comes with it


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a checkpoint of this project (e.g. a teacher's), or of a Hugging Face folder or hub id."""
    if name.endswith(".ckpt"):
        return Tokenizer.from_checkpoint(name)
    return Tokenizer(name, _load_pretrained(name))


def char_tokenizer(symbols: set[str], end_of_text: bool = False) -> Tokenizer:
    """One token per symbol; with `end_of_text`, EOS_TOKEN after them as the end-of-document token (and pad)."""
    # Sorted symbols give nanoGPT's ids (its stoi), so results compare one to one.
    vocab = {char: i for i, char in enumerate(sorted(symbols))}
    if end_of_text:
        vocab[EOS_TOKEN] = len(vocab)
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token=None))
    # Every character is its own pre-token, spaces and newlines included, and decoding just concatenates.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if not end_of_text:
        return Tokenizer("char", _wrap(backend))
    backend.add_special_tokens([EOS_TOKEN])  # matched whole, never split into its characters
    return Tokenizer("char", _wrap(backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN))


def train_bpe(texts, vocab_size: int | None) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) of `vocab_size` tokens learnt from the strings `texts`, EOS_TOKEN among them.

    Merges stop where the text has no pair left to merge: a size the text cannot reach is a one-line error
    saying what it reached.
    """
    if vocab_size is None or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise UserError(
            f"the 'bpe' tokenizer needs vocab_size >= {MIN_BPE_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), "
            f"got {vocab_size}; pass e.g. vocab_size=512"
        )
    # Byte-level: every string is encodable and decoding restores it exactly.
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    reached = backend.get_vocab_size(with_added_tokens=True)
    if reached < vocab_size:
        raise UserError(
            f"BPE reached only {reached} of the {vocab_size} tokens asked for: the text has no more pairs to merge; "
            f"pass vocab_size <= {reached} or more text"
        )
    return Tokenizer("bpe", _wrap(backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN))


def _load_pretrained(name: str):
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise UserError(
            f"cannot load tokenizer {name!r} ({first_line(err)}); use 'char', 'bpe', a local tokenizer "
            "directory, or a Hugging Face hub id while online"
        ) from err
    if not hasattr(hf, "backend_tokenizer"):
        raise UserError(f"tokenizer {name!r} has no fast (Rust) version; pick a tokenizer with a tokenizer.json")
    if hf.pad_token is None and hf.eos_token is not None:
        hf.pad_token = hf.eos_token  # batches need a pad id; padded positions are masked out anyway
    return hf


def _wrap(backend: BackendTokenizer, **special_tokens):
    from transformers import PreTrainedTokenizerFast

    # No cleanup: it would rewrite " ," as "," and break exact round trips.
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special_tokens)


def _require_text(text: str | None, kind: str) -> str:
    if not isinstance(text, str) or not text:
        raise UserError(f"the {kind!r} tokenizer is built from text; pass a non-empty text=...")
    return text
