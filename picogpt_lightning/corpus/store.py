"""The token store: a corpus tokenized once, as nanoGPT keeps it, one flat file of token ids per split.

    DIR/manifest.json   what the store holds: sources (size, sha256), tokens and documents per split,
                        dtype, vocabulary size, the tokenizer's kind, special tokens and sha256
    DIR/tokenizer.json  the tokenizer, in the Hugging Face `tokenizers` format
    DIR/train.bin       uint16 token ids (uint32 past 65,536 tokens), documents one after another,
    DIR/val.bin         each ended by the tokenizer's end-of-text token

Reading is `np.memmap`: nothing is loaded, memory does not grow with the corpus, and every rank
and node that sees the directory (local disk, NFS, Lustre) reads the same bytes. A store is
checked when opened: sizes against the manifest, the tokenizer against its hash.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.tokenizer import Tokenizer

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
STORE_FORMAT = "picogpt_lightning token store"
STORE_VERSION = 1
SPLITS = ("train", "val")


class StoreError(UserError):
    """A token store that is missing, damaged or not one: one line naming the path and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_digest(tokenizer_json: str, special_tokens: dict) -> str:
    payload = tokenizer_json + json.dumps(special_tokens, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def is_store(path) -> bool:
    """Whether `path` is a directory an earlier prepare wrote (what --overwrite may replace)."""
    try:
        return json.loads((Path(path) / MANIFEST_NAME).read_text()).get("format") == STORE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class StoreWriter:
    """Writes a store into an empty staging directory (write_directory_atomically fsyncs it and renames it into
    place whole): tokens appended split by split, the manifest last."""

    def __init__(self, directory, tokenizer: Tokenizer):
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.documents = dict.fromkeys(SPLITS, 0)
        self._files = {split: open(self.directory / f"{split}.bin", "wb") for split in SPLITS}

    def append(self, split: str, ids: np.ndarray, documents_ended: int = 0) -> None:
        self._files[split].write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.tokens[split] += len(ids)
        self.documents[split] += documents_ended

    def finish(self, **extra) -> dict:
        """Closes the token files and writes tokenizer.json and manifest.json; returns the manifest."""
        for file in self._files.values():
            file.close()
        described = self.tokenizer.to_dict()
        (self.directory / TOKENIZER_NAME).write_text(described["tokenizer_json"], encoding="utf-8")
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "dtype": self.dtype.name,
            "splits": {split: {"tokens": self.tokens[split], "documents": self.documents[split]} for split in SPLITS},
            "tokenizer": {
                "kind": described["kind"],
                "vocab_size": self.tokenizer.vocab_size,
                "special_tokens": described["special_tokens"],
                "eos_token_id": self.tokenizer.eos_token_id,
                "chat_template": described["chat_template"],
                "sha256": tokenizer_digest(described["tokenizer_json"], described["special_tokens"]),
            },
            **extra,
        }
        (self.directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest

    def close(self) -> None:
        for file in self._files.values():
            file.close()


class TokenStore:
    """A store on disk, checked on opening; `tokens(split)` maps a split's ids without reading them."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise InputNotFound(f"token store {self.path} does not exist; make it with: python -m picogpt_lightning "
                                f"prepare --source <your text> --out {self.path}")
        try:
            self.manifest = json.loads((self.path / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise StoreError(f"{self.path} has no readable {MANIFEST_NAME}: it is not a token store (or a damaged "
                             "one); prepare it again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.path / MANIFEST_NAME} is not a token store's manifest; prepare the store again")
        self.dtype = np.dtype(self.manifest["dtype"])
        for split in SPLITS:
            self._check_size(split)
        self._check_tokenizer()

    def _check_size(self, split: str) -> None:
        file = self.path / f"{split}.bin"
        expected = self.num_tokens(split) * self.dtype.itemsize
        found = file.stat().st_size if file.is_file() else None
        if found != expected:
            held = "is missing" if found is None else f"holds {found} bytes"
            raise StoreError(f"token store {self.path} is damaged: {file.name} {held}, the manifest says {expected}; "
                             "prepare it again")

    def _check_tokenizer(self) -> None:
        entry = self.manifest["tokenizer"]
        try:
            self._tokenizer_json = (self.path / TOKENIZER_NAME).read_text(encoding="utf-8")
        except OSError:
            raise StoreError(f"token store {self.path} has no {TOKENIZER_NAME}; prepare it again") from None
        if tokenizer_digest(self._tokenizer_json, entry["special_tokens"]) != entry["sha256"]:
            raise StoreError(f"token store {self.path}: {TOKENIZER_NAME} does not match the manifest (changed after "
                             "prepare?); prepare the store again")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        entry = self.manifest["tokenizer"]
        return Tokenizer.from_dict(
            {"kind": entry["kind"], "tokenizer_json": self._tokenizer_json, "special_tokens": entry["special_tokens"],
             "chat_template": entry.get("chat_template")}
        )

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def num_tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped read-only (an empty array for an empty split)."""
        if self.num_tokens(split) == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")
