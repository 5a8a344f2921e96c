"""tiny_shakespeare (or any `data_path`) tokenized once into the cache, split as TinyShakespeareDataModule splits it.

The first (1 - val_fraction) of the characters train and the rest validate, each split one run
of text with no end-of-text token: nanoGPT's shakespeare_char data, so its recipes behave as they
always have. The store is keyed by the corpus's md5 and the tokenizer asked for; a later run, or
another rank, opens it instead of tokenizing again (a BPE is not retrained either).
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

from picogpt_lightning.atomic import write_directory_atomically
from picogpt_lightning.corpus import TokenStore, is_store, tokenize_into
from picogpt_lightning.corpus.sections import sections
from picogpt_lightning.data.source import default_cache_dir, find_corpus, read_corpus
from picogpt_lightning.data.splits import split_point
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer

STORES_DIRECTORY = "stores"


def cached_store(data_path, tokenizer, vocab_size: int | None, val_fraction: float, cache_dir=None) -> TokenStore:
    """The corpus's store in the cache, made on first use (atomically: concurrent ranks never see a part of one).
    `tokenizer`: "char", "bpe", a folder, hub id or checkpoint, or a Tokenizer (a model's own)."""
    path = find_corpus(data_path, cache_dir=cache_dir)
    digest = _md5(path)
    if isinstance(tokenizer, Tokenizer):
        named = tokenizer
    else:
        named = None if tokenizer in ("char", "bpe") else build_tokenizer(tokenizer)  # a folder, hub id or checkpoint
    key = tokenizer if named is None else "tokenizer-" + _sha256(json.dumps(named.to_dict(), sort_keys=True))[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    size = f"-{vocab_size}" if vocab_size is not None else ""
    target = root / STORES_DIRECTORY / f"{stem}-{digest[:12]}-{key}{size}-val{val_fraction}"
    if is_store(target):
        return TokenStore(target)
    with exclusive_lock(target.with_name(target.name + ".lock")):  # every rank asks at once: one of them makes it
        if not is_store(target):
            _write_store(path, digest, target, tokenizer, named, vocab_size, val_fraction)
    return TokenStore(target)


def _write_store(path: Path, digest: str, target: Path, tokenizer: str, named, vocab_size, val_fraction: float) -> None:
    text = read_corpus(path)
    cut = split_point(text, val_fraction)
    if tokenizer == "char":  # every symbol of the corpus, 65 for tiny_shakespeare, like nanoGPT
        made = build_tokenizer("char", text=text)
    elif tokenizer == "bpe":  # merges learnt on training text only
        made = build_tokenizer("bpe", text=text[:cut], vocab_size=vocab_size)
    else:
        made = named
    items = [("train", section, last) for section, last in sections([text[:cut]])]
    items += [("val", section, last) for section, last in sections([text[cut:]])]
    source = {"path": str(path), "bytes": path.stat().st_size, "md5": digest}
    write_directory_atomically(
        str(target),
        lambda staging: tokenize_into(staging, made, items, end_documents=False, sources=[source], val_fraction=val_fraction),
    )


@contextmanager
def exclusive_lock(path: Path):
    """An advisory lock on `path` (flock), held by one process at a time, released when the block ends."""
    import fcntl  # POSIX; the cache is written by this module alone

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:  # an empty file that only marks the lock
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
