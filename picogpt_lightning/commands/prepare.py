"""`python -m picogpt_lightning prepare`: your text in, a token store out, tokenized once (picogpt_lightning/corpus/)."""

import os
import time
from typing import List, Optional, Union

from picogpt_lightning.stop_signals import exits_on_signals
from picogpt_lightning.commands.outputs import writing_output
from picogpt_lightning.corpus import TokenStore, is_store, prepare_store
from picogpt_lightning.errors import UserError

LIST_FLAGS = ("--source",)  # `--source a.txt b.txt`: every word up to the next flag (cli.py joins them)


class Progress:
    """tqdm's bar over the text read, with the tokens written per second beside MB/s (shown on a terminal only)."""

    def __init__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="prepare", disable=None)
        self.start, self.tokens = time.perf_counter(), 0

    def __call__(self, text_bytes: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.start) / 1e6:.2f}M tokens/s", refresh=False)
        self.bar.update(text_bytes)

    def close(self) -> None:
        self.bar.close()


def prepare(
    source: Union[str, List[str]],
    out: str,
    tokenizer: str = "char",
    vocab_size: Optional[int] = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    workers: Optional[int] = None,
    overwrite: bool = False,
) -> None:
    """Tokenize text once into a token store that TokenStoreDataModule trains on (configs/pretrain_corpus.yaml).

    Args:
        source: text files, folders (read recursively), globs, JSONL/Parquet/CSV files, or folders written by datasets' save_to_disk; several may follow --source.
        out: the store's directory, written whole or not at all.
        tokenizer: "char" (the corpus's symbols plus an end-of-text token), "bpe" (byte-level BPE learnt on a sample of the training text; needs --vocab_size), a Hugging Face tokenizer folder or hub id, or a checkpoint of this project (its tokenizer, unchanged).
        vocab_size: the BPE vocabulary's size.
        text_field: the field holding the text in JSONL, Parquet, CSV and datasets sources.
        val_fraction: the share of documents (of a long document, of its 64 KiB sections) that validate, spread evenly through the corpus.
        workers: threads that tokenize (default: every core).
        overwrite: replace an earlier store at out (never anything else).
    """
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)):
        raise UserError(f"--out {out} is a file; a store is a directory: choose another --out")
    inputs = [source] if isinstance(source, str) else source
    with writing_output(out, overwrite, inputs=inputs, directory=True, written_here=is_store):  # one writer at a time
        prepare_locked(source, out, tokenizer, vocab_size, text_field, val_fraction, workers)


def prepare_locked(source, out, tokenizer, vocab_size, text_field, val_fraction, workers) -> None:
    if workers is not None:
        if isinstance(workers, bool) or workers < 1:
            raise UserError(f"--workers must be a positive int, got {workers!r}")
        os.environ["RAYON_NUM_THREADS"] = str(workers)  # the tokenizers library's thread pool, read when first used
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sources = [source] if isinstance(source, str) else list(source)
    progress = Progress()
    start = time.perf_counter()
    try:
        with exits_on_signals():  # SIGTERM/SIGINT: the staging directory is removed and the exit is 143/130
            store = prepare_store(sources, out, tokenizer, vocab_size, text_field, val_fraction, on_batch=progress)
    finally:
        progress.close()
    print(summary(store, time.perf_counter() - start))


def summary(store: TokenStore, seconds: float) -> str:
    splits = store.manifest["splits"]
    tokens = sum(split["tokens"] for split in splits.values())
    text = sum(source["bytes"] for source in store.manifest["sources"])
    return (
        f"wrote {store.path}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
        f"({store.manifest['dtype']}), vocabulary {store.vocab_size:,}, {text / 1e6:.1f} MB in {seconds:.1f} s "
        f"({text / 1e6 / seconds:.2f} MB/s, {tokens / 1e6 / seconds:.2f}M tokens/s)"
    )
