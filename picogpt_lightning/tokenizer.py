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
from picogpt_lightning.tokenizer_format import DEFAULT_CHAT_TEMPLATE, load_pretrained, tokenizer_dict

EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB_SIZE = 256 + 1  # every byte, plus EOS_TOKEN
_KIND_KEY = "picogpt_kind"  # saved in tokenizer_config.json so load() knows the kind again
OWN_KINDS = ("char", "bpe")  # built here, with DEFAULT_CHAT_TEMPLATE
CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """Text <-> token ids, whatever the kind; ``hf`` is the underlying transformers tokenizer."""

    def __init__(
        self, kind: str, hf=None, backend: BackendTokenizer | None = None, special_tokens: dict | None = None,
        chat_template: str | None = None,
    ):
        """From a transformers ``PreTrainedTokenizerFast`` (`hf`), or from its Rust `backend` and
        `special_tokens` ({"eos_token": "...", ...}), the transformers object then made when first used.
        `chat_template`: a Jinja chat template (default: `hf`'s own, or DEFAULT_CHAT_TEMPLATE for char and bpe)."""
        self.kind = kind
        self._hf = hf
        self.backend = hf.backend_tokenizer if hf is not None else backend
        self._special_tokens = dict(special_tokens or {})
        if chat_template is None and hf is not None and isinstance(hf.chat_template, str):
            chat_template = hf.chat_template
        self.chat_template = chat_template or (DEFAULT_CHAT_TEMPLATE if kind in OWN_KINDS else None)
        if hf is not None:
            hf.chat_template = self.chat_template
        # encode() calls the Rust backend directly; like transformers does on each call that asks for
        # neither, turn off any truncation or padding a tokenizer.json may carry.
        self.backend.no_truncation()
        self.backend.no_padding()

    @property
    def hf(self):
        """The transformers tokenizer (a ``PreTrainedTokenizerFast``)."""
        if self._hf is None:
            self._hf = _wrap(self.backend, **self._special_tokens)
            self._hf.chat_template = self.chat_template
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
        return Tokenizer(self.kind, hf, chat_template=self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; add_special_tokens adds what the tokenizer adds to a text (a Llama's BOS)."""
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (the backend encodes them in parallel)."""
        # Plain ids need none of transformers' bookkeeping, which would double the time on a corpus,
        # nor the character offsets that `encode_batch_fast` (tokenizers >= 0.20.1) skips.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        try:
            encodings = encode(list(texts), add_special_tokens=add_special_tokens)
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

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        """The conversation as text, through the chat template (transformers' apply_chat_template)."""
        check_messages(messages)
        if not self.chat_template:
            raise UserError(
                f"the {self.kind!r} tokenizer has no chat template; give the model a tokenizer with one "
                "(tokenizer_config.json chat_template) or send plain prompts"
            )
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_prompt(self, messages: list) -> str:
        """The conversation rendered for the assistant's reply, as a prompt `encode(..., add_special_tokens=True)`
        turns into the template's own tokens: a BOS the template writes and the tokenizer adds is left out here."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        bos = self.hf.bos_token
        adds_bos = self.bos_token_id is not None and self.encode("a", add_special_tokens=True)[:1] == [self.bos_token_id]
        return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text

    def to_dict(self) -> dict:
        """A JSON-able description that ``from_dict`` turns back into an identical tokenizer."""
        special = dict(self._hf.special_tokens_map) if self._hf is not None else dict(self._special_tokens)
        return tokenizer_dict(self.kind, self.backend.to_str(), special, self.chat_template)

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        if not isinstance(d, dict):
            raise UserError(f"Tokenizer.from_dict takes the dict made by to_dict(), got {type(d).__name__}")
        missing = [key for key in ("kind", "tokenizer_json", "special_tokens") if key not in d]
        if missing:
            raise UserError(f"tokenizer dict lacks {missing}; pass a dict made by Tokenizer.to_dict()")
        backend = BackendTokenizer.from_str(d["tokenizer_json"])
        return cls(d["kind"], backend=backend, special_tokens=d["special_tokens"], chat_template=d.get("chat_template"))

    def save(self, directory: str | os.PathLike) -> None:
        """Write Hugging Face files, so ``AutoTokenizer.from_pretrained(directory)`` loads them too."""
        self.hf.init_kwargs[_KIND_KEY] = self.kind
        self.hf.chat_template = self.chat_template  # written beside it (chat_template.jinja)
        self.hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        if not Path(directory).is_dir():
            raise InputNotFound(f"tokenizer directory {directory} does not exist; pass one written by save()")
        hf = load_pretrained(str(directory))
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
    return Tokenizer(name, load_pretrained(name))


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


def _wrap(backend: BackendTokenizer, **special_tokens):
    from transformers import PreTrainedTokenizerFast

    # No cleanup: it would rewrite " ," as "," and break exact round trips.
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special_tokens)


def _require_text(text: str | None, kind: str) -> str:
    if not isinstance(text, str) or not text:
        raise UserError(f"the {kind!r} tokenizer is built from text; pass a non-empty text=...")
    return text


def check_messages(messages) -> None:
    """A conversation as OpenAI and trl write it: a non-empty list of {"role", "content"} with text content."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise UserError(f"messages[{i}] needs a role among {list(CHAT_ROLES)}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"messages[{i}].content must be text, got {type(message.get('content')).__name__}")
