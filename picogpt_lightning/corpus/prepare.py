"""prepare: sources -> tokenizer (made or loaded once) -> a token store, written atomically.

Tokenizing is the `tokenizers` library's batch encoder: Rust threads over the sections of a
batch (RAYON_NUM_THREADS of them), with the GIL released, so the next batch is read and the
last one written while the current one encodes. Memory stays at a few batches whatever the
corpus's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from picogpt_lightning.atomic import write_directory_atomically
from picogpt_lightning.corpus.sections import in_validation, sections
from picogpt_lightning.corpus.sources import Source, documents, resolve_sources
from picogpt_lightning.corpus.store import SPLITS, StoreWriter, TokenStore
from picogpt_lightning.errors import UserError
from picogpt_lightning.tokenizer import Tokenizer, char_tokenizer, load_tokenizer, train_bpe

BATCH_CHARS = 4 << 20  # text encoded per call: enough sections to keep every thread busy
BPE_SAMPLE_CHARS = 32 << 20  # BPE merges are learnt on about this much training text, spread over the corpus

Section = tuple[str, str, bool]  # (split, text, ends its document)


def corpus_sections(sources: list[Source], text_field: str, val_fraction: float) -> Iterator[Section]:
    """Every section of every document, in order, with its split (corpus/sections.py)."""
    index = 0
    for source in sources:
        for document in documents(source, text_field):
            for text, last in sections(document):
                yield ("val" if in_validation(index, val_fraction) else "train"), text, last
                index += 1


def corpus_tokenizer(kind: str, vocab_size: int | None, read: Callable[[], Iterator[Section]], corpus_chars: int) -> Tokenizer:
    """'char': every symbol of the corpus plus an end-of-text token; 'bpe': byte-level BPE learnt on a sample of
    the training sections; else a Hugging Face tokenizer folder or hub id, or a checkpoint's tokenizer, unchanged."""
    if kind != "bpe" and vocab_size is not None:
        raise UserError(f"--vocab_size applies only to --tokenizer bpe; the {kind!r} vocabulary is fixed")
    if kind == "char":
        symbols: set[str] = set()
        for _, text, _ in read():
            symbols.update(text)
        return char_tokenizer(symbols, end_of_text=True)
    if kind == "bpe":
        if vocab_size is None:
            raise UserError("--tokenizer bpe needs --vocab_size (e.g. 8192) to train to")
        stride = max(1, corpus_chars // BPE_SAMPLE_CHARS)
        sample = (text for i, (split, text, _) in enumerate(read()) if split == "train" and i % stride == 0)
        return train_bpe(sample, vocab_size)
    return load_tokenizer(kind)


def tokenize_into(
    directory: str, tokenizer: Tokenizer, items: Iterable[Section], end_documents: bool = True,
    on_batch: Callable[[int, int], None] | None = None, **manifest,
) -> dict:
    """Encodes `items` into a store at `directory` (empty); `on_batch(text bytes, tokens)` after each batch."""
    writer = StoreWriter(directory, tokenizer)
    eos = tokenizer.eos_token_id if end_documents else None
    try:
        with ThreadPoolExecutor(1) as encoder:
            pending = None
            for batch in _batches(items):
                submitted = (batch, encoder.submit(tokenizer.encode_batch, [text for _, text, _ in batch]))
                if pending is not None:
                    _write(writer, *pending, eos, on_batch)
                pending = submitted
            if pending is not None:
                _write(writer, *pending, eos, on_batch)
        return writer.finish(**manifest)
    finally:
        writer.close()


def _batches(items: Iterable[Section]) -> Iterator[list[Section]]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[1])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write(writer: StoreWriter, batch: list[Section], encoded, eos: int | None, on_batch) -> None:
    tokens = 0
    for (split, _, last), ids in zip(batch, encoded.result()):
        if last and eos is not None:
            ids.append(eos)
        writer.append(split, np.array(ids, dtype=writer.dtype), documents_ended=int(last))
        tokens += len(ids)
    if on_batch is not None:
        on_batch(sum(len(text.encode()) for _, text, _ in batch), tokens)


def prepare_store(
    sources: list[str], out: str, tokenizer: str = "char", vocab_size: int | None = None, text_field: str = "text",
    val_fraction: float = 0.1, on_batch: Callable[[int, int], None] | None = None,
) -> TokenStore:
    """Tokenizes `sources` once into a token store at `out` (replaced whole, atomically); see commands/prepare.py."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    resolved = resolve_sources(sources)
    described = [source.describe() for source in resolved]
    read = lambda: corpus_sections(resolved, text_field, val_fraction)  # noqa: E731 - each pass reads anew
    made = corpus_tokenizer(tokenizer, vocab_size, read, sum(entry["bytes"] for entry in described))

    def write(staging: str) -> None:
        manifest = tokenize_into(staging, made, read(), on_batch=on_batch, sources=described,
                                 text_field=text_field, val_fraction=val_fraction)
        for split in SPLITS:
            if manifest["splits"][split]["tokens"] == 0:
                raise UserError(
                    f"the {split} split is empty: the corpus has too few documents (or 64 KiB sections) for "
                    f"--val_fraction {val_fraction}; change --val_fraction or add text"
                )

    write_directory_atomically(out, write)
    return TokenStore(out)
