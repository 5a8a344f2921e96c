"""The token store's engine: nanoGPT's memory map (TokenStoreDataModule) against litdata's optimize + streaming.

    python -m benchmarks.bench_store_engines --store DIR [--batches 2000]   # DIR: a store made by `prepare`

The same train tokens (the store's train.bin) are written by litdata's `optimize` with its
`TokensLoader`, as litgpt writes TinyStories, then both engines serve batches of 12 windows of 65
tokens (pretrain_cpu's batch) in one process: the seconds to write, to the first batch, the
batches per second after it, and the resident memory the reading added. Skips with one line
where litdata is not installed (it is not a dependency: `pip install litdata`).
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.corpus import TokenStore
from picogpt_lightning.data import TokenStoreDataModule

BLOCK_SIZE, BATCH_SIZE = 64, 12
TOKENS_PER_ITEM = 1 << 20  # what one optimize input yields


def resident_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def serve(loader, batches: int) -> tuple:
    """(seconds to the first batch, batches/s after it, MB of resident memory added)."""
    before, start = resident_mb(), time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return first, batches / (time.perf_counter() - start), resident_mb() - before


def memmap_engine(store: Path, batches: int) -> tuple:
    data = TokenStoreDataModule(str(store), block_size=BLOCK_SIZE, batch_size=BATCH_SIZE)
    data.setup("fit")
    return (0.0, *serve(data.train_dataloader(), batches))


def token_items(index: int, path: str = "", dtype: str = "uint16"):
    tokens = np.memmap(path, dtype=dtype, mode="r")
    yield torch.from_numpy(np.asarray(tokens[index : index + TOKENS_PER_ITEM], dtype=np.int64))


def litdata_engine(store: Path, batches: int, work: Path) -> tuple:
    from functools import partial

    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader, optimize

    opened = TokenStore(store)
    train = opened.path / "train.bin"
    start = time.perf_counter()
    optimize(fn=partial(token_items, path=str(train), dtype=opened.dtype.name),
             inputs=list(range(0, opened.num_tokens("train"), TOKENS_PER_ITEM)), output_dir=str(work),
             chunk_bytes="64MB", item_loader=TokensLoader(), num_workers=1)
    written = time.perf_counter() - start
    dataset = StreamingDataset(input_dir=str(work), item_loader=TokensLoader(block_size=BLOCK_SIZE + 1), shuffle=True)
    return (written, *serve(StreamingDataLoader(dataset, batch_size=BATCH_SIZE, num_workers=0), batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store made by prepare (e.g. bench_corpus's 1 GB one)")
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    try:
        import litdata  # noqa: F401
    except ImportError:
        print("skipped: litdata is not installed (pip install litdata)")
        return
    store = Path(args.store)
    work = Path(tempfile.mkdtemp(prefix="litdata-", dir=os.environ.get("TMPDIR")))
    try:
        results = {"memory map (TokenStoreDataModule)": memmap_engine(store, args.batches),
                   "litdata (optimize + StreamingDataset)": litdata_engine(store, args.batches, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = TokenStore(store).num_tokens("train")
    rows = [(name, f"{written:.1f}", f"{first:.2f}", f"{speed:.0f}", f"{added:.0f}")
            for name, (written, first, speed, added) in results.items()]
    body = (
        f"{machine_description()}. `python -m benchmarks.bench_store_engines --store {store.name} --batches "
        f"{args.batches}`: the train split of a store of {tokens / 1e6:.0f}M tokens, batches of {BATCH_SIZE} windows of "
        f"{BLOCK_SIZE + 1} tokens, one process; written: seconds litdata's `optimize` takes on top of `prepare` "
        "(the memory map reads the store as it is).\n\n"
        + markdown_table(["engine", "written (s)", "s to first batch", "batches/s", "resident MB added"], rows)
        + "\n\nThe memory map also draws each window at a fresh random offset; litdata's `TokensLoader` serves "
        "fixed blocks in shuffled order."
    )
    write_section("store_engines", "Corpora: the store's engine, memory map against litdata", body)


if __name__ == "__main__":
    main()
