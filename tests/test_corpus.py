"""Your own corpus: `prepare` from every source kind into a token store, and TokenStoreDataModule over it.

References: the documents as written (each ends with the end-of-text token, every 1/f-th one
validates by the formula written out below), the source text itself (every window decodes to a
piece of it), an uninterrupted run's losses (a resumed one repeats them step for step).
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning as L
import numpy as np
import pytest
import torch

from picogpt_lightning.cli import main
from picogpt_lightning.corpus import TokenStore, prepare_store
from picogpt_lightning.corpus.sections import sections
from picogpt_lightning.data import TokenStoreDataModule, build_tokenizer
from picogpt_lightning.data.token_store import splitmix64
from picogpt_lightning.modules import LanguageModelModule
from test_faults_inputs import one_line_error
from tiny_training import LossRecorder, quiet_trainer, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:.*dataloader is not resumable", "ignore:.*does not have many workers")

EOS = "<|endoftext|>"
REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [f"Document {i}: {'to be or not to be, ' * (i % 5 + 1)}that is question {i}.\n" for i in range(40)]


def split_documents(store: TokenStore, split: str) -> list:
    """A split decoded and cut at the end-of-text token: the documents it holds, in order."""
    text = store.tokenizer.decode(np.asarray(store.tokens(split)).tolist())
    assert text.endswith(EOS)
    return text.split(EOS)[:-1]


def expected_split(documents: list, val_fraction: float) -> tuple:
    """Every 1/f-th document validates: document j when floor((j + 1) f) > floor(j f)."""
    val = [d for j, d in enumerate(documents) if math.floor((j + 1) * val_fraction) > math.floor(j * val_fraction)]
    return [d for d in documents if d not in val], val


def write_source(kind: str, folder: Path) -> str:
    """DOCUMENTS as a source of `kind`; returns what --source names."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"id": i, "text": text} for i, text in enumerate(DOCUMENTS)]
    if kind == "jsonl":
        (folder / "docs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        return str(folder / "docs.jsonl")
    if kind == "csv":
        with open(folder / "docs.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(records)
        return str(folder / "docs.csv")
    if kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(folder / "docs.parquet"))
        return str(folder / "docs.parquet")
    if kind == "saved":
        datasets.Dataset.from_list(records).save_to_disk(str(folder / "saved"))
        return str(folder / "saved")
    for i, text in enumerate(DOCUMENTS):  # text files, in nested folders, named so their sorted order is DOCUMENTS'
        path = folder / "texts" / f"part{i // 10}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(folder / "texts") if kind == "folder" else str(folder / "texts" / "**" / "*.txt")


@pytest.mark.parametrize("kind", ["folder", "glob", "jsonl", "csv", "parquet", "saved"])
def test_prepare_reads_every_source_kind_into_documents_ended_by_eos(tmp_path, kind):
    source = write_source(kind, tmp_path / "src")
    main(["prepare", "--source", source, "--out", str(tmp_path / "store"), "--val_fraction", "0.25"])
    store = TokenStore(tmp_path / "store")
    train, val = expected_split(DOCUMENTS, 0.25)
    assert split_documents(store, "train") == train and split_documents(store, "val") == val
    assert store.manifest["splits"]["val"]["documents"] == len(val) == 10
    assert store.tokenizer.eos_token_id == store.vocab_size - 1  # the char vocabulary gained one token
    assert all(entry["sha256"] and entry["bytes"] > 0 for entry in store.manifest["sources"])


def test_several_sources_follow_one_flag_and_a_text_file_is_one_document(tmp_path, corpus_path):
    short = tmp_path / "short.txt"
    short.write_text("ROMEO:\nBut soft!\n")
    main(["prepare", "--source", str(short), str(corpus_path), "--out", str(tmp_path / "store"), "--val_fraction", "0.1"])
    store = TokenStore(tmp_path / "store")
    # sections of 64 KiB: the short file is section 0, tiny_shakespeare's 18 follow; 0.1 sends section 9 to val
    assert store.manifest["splits"]["train"]["documents"] == 2
    assert split_documents(store, "train")[0] == short.read_text()
    whole = store.tokenizer.decode(np.concatenate([store.tokens("train"), store.tokens("val")]).tolist())
    assert sorted(whole.replace(EOS, "")) == sorted(short.read_text() + corpus_path.read_text())


def test_bpe_sections_encode_exactly_as_the_whole_text(corpus_path):
    text = corpus_path.read_text()[:300_000]
    tokenizer = build_tokenizer("bpe", text=text, vocab_size=400)
    pieces = [piece for piece, _ in sections([text[i : i + 50_000] for i in range(0, len(text), 50_000)], size=8_192)]
    assert len(pieces) > 30 and "".join(pieces) == text
    assert sum(tokenizer.encode_batch(pieces), []) == tokenizer.encode(text)


@pytest.fixture(scope="module")
def shakespeare_store(tmp_path_factory, corpus_path):
    out = tmp_path_factory.mktemp("stores") / "shakespeare"
    prepare_store([str(corpus_path)], str(out), tokenizer="bpe", vocab_size=384)
    return out


def test_windows_are_pieces_of_the_source_and_fresh_at_every_step(shakespeare_store, corpus_path):
    text = corpus_path.read_text()
    dm = TokenStoreDataModule(str(shakespeare_store), block_size=48, batch_size=6, train_samples=12)
    dm.setup("fit")
    loader, batches = dm.train_dataloader(), []
    for epoch in range(3):  # 2 steps an epoch
        loader.sampler.set_epoch(epoch)  # as Lightning does
        batches += [batch["input_ids"] for batch in loader]
    for window in torch.cat(batches):
        for piece in dm.tokenizer.decode(window).split(EOS):
            assert piece in text
    rows = {tuple(row.tolist()) for row in torch.cat(batches)}
    assert len(rows) == 36  # no window repeats, not even across epochs
    assert dm.vocab_size == 384 and dm.tokenizer.to_dict() == TokenStore(shakespeare_store).tokenizer.to_dict()


def test_random_starts_follow_splitmix64_and_cover_the_split(shakespeare_store):
    dm = TokenStoreDataModule(str(shakespeare_store), block_size=32, batch_size=4, seed=7)
    dm.setup("fit")
    dataset = dm.train_dataset
    numbers = np.arange(20_000)

    def splitmix(x):  # the generator's published output function, in Python integers
        mask = (1 << 64) - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    seed_bits = splitmix(7)
    reference = [splitmix(((n + 1) * 0x9E3779B97F4A7C15 + seed_bits) & ((1 << 64) - 1)) % (dataset.size - 32) for n in range(50)]
    assert dataset.starts(numbers[:50]).tolist() == reference
    starts = dataset.starts(numbers)
    assert starts.min() >= 0 and starts.max() <= dataset.size - 33
    assert np.histogram(starts, bins=10)[0].min() > 1800  # uniform: about 2000 starts in each tenth
    assert np.array_equal(splitmix64(np.array([7], dtype=np.uint64)), np.array([seed_bits], dtype=np.uint64))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_two_ranks_draw_different_windows(shakespeare_store, mode):
    firsts, numbers = [], []
    for rank in range(2):
        dm = TokenStoreDataModule(str(shakespeare_store), block_size=32, batch_size=4, mode=mode, train_samples=64)
        # what the data module reads of Lightning's DDP Trainer on each rank
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        dm.setup("fit")
        loader = dm.train_dataloader()
        numbers.append(list(loader.sampler))
        firsts.append(next(iter(loader))["input_ids"])
    assert not set(numbers[0]) & set(numbers[1]) and len(numbers[0]) == len(numbers[1]) == 32
    assert not torch.equal(firsts[0], firsts[1])
    if mode == "sequential":  # packed chunks: rank r's first window is chunk r
        tokens = np.asarray(TokenStore(shakespeare_store).tokens("train"))
        for rank, first in enumerate(firsts):
            assert first[0].tolist() == tokens[rank * 33 : rank * 33 + 32].tolist()


class SaveAtStep(L.Callback):
    """Saves the run's state after a given step, mid-run, as the project's checkpoint callbacks do."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def run_steps(store, max_steps: int, ckpt_in=None, ckpt_out=None) -> list:
    torch.manual_seed(0)
    dm = TokenStoreDataModule(str(store), block_size=16, batch_size=2, train_samples=6, seed=3)
    model = LanguageModelModule(config=tiny_config(vocab_size=dm.vocab_size, block_size=16), warmup_steps=2, lr_decay_steps=8)
    recorder = LossRecorder()
    callbacks = [recorder] + ([SaveAtStep(max_steps, ckpt_out)] if ckpt_out is not None else [])
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    return recorder.losses


def test_a_resumed_run_repeats_the_uninterrupted_runs_losses(shakespeare_store, tmp_path):
    whole = run_steps(shakespeare_store, 8)  # 3 steps an epoch: the stop at step 4 is mid-epoch
    first = run_steps(shakespeare_store, 4, ckpt_out=tmp_path / "step4.ckpt")
    rest = run_steps(shakespeare_store, 8, ckpt_in=tmp_path / "step4.ckpt")
    assert len(whole) == 8 and first + rest == pytest.approx(whole, rel=1e-6)


def test_tiny_shakespeare_is_tokenized_once_into_the_cache(corpus_path, tmp_path, monkeypatch):
    from picogpt_lightning.data import TinyShakespeareDataModule

    monkeypatch.setenv("PICOGPT_CACHE", str(tmp_path / "cache"))
    first = TinyShakespeareDataModule(data_path=str(corpus_path), block_size=32)
    assert first.vocab_size == 65  # nanoGPT's vocabulary: no end-of-text token added
    stores = sorted((tmp_path / "cache" / "stores").iterdir())
    assert len(stores) == 2 and stores[1].name == stores[0].name + ".lock"  # one store, and the lock its makers take
    made = stores[0].stat().st_mtime_ns
    second = TinyShakespeareDataModule(data_path=str(corpus_path), block_size=32)
    second.setup("fit")
    assert stores[0].stat().st_mtime_ns == made and sorted((tmp_path / "cache" / "stores").iterdir()) == stores
    text = corpus_path.read_text()
    cut = int(len(text) * 0.9)
    assert second.tokenizer.decode(second.store.tokens("val")) == text[cut:]


# ---- a killed prepare leaves no store ------------------------------------------------------------------


def start_prepare(source: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "picogpt_lightning", "prepare", "--source", str(source), "--out", str(out)]
    return subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})


def wait_for_staging(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any((path / "train.bin").is_file() and (path / "train.bin").stat().st_size for path in out.parent.glob(f".{out.name}.*.partial")):
            return
        time.sleep(0.05)
    raise AssertionError(f"prepare wrote nothing to stage (status {process.poll()})")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_prepare_leaves_no_store_and_the_next_one_cleans_up(tmp_path, corpus_path, signum):
    big = tmp_path / "big.txt"
    big.write_text(corpus_path.read_text() * 12)  # 13 MB: seconds of tokenizing on one thread
    out = tmp_path / "store"
    process = start_prepare(big, out)
    wait_for_staging(out, process)
    process.send_signal(signum)
    status = process.wait(timeout=60)
    assert not out.exists()
    if signum == signal.SIGTERM:
        assert status == 143 and not list(tmp_path.glob(".store.*"))  # it removed its own staging directory
    else:
        assert list(tmp_path.glob(".store.*.partial"))  # SIGKILL: nothing can clean up, until the next run
    small = tmp_path / "small.txt"
    small.write_text(corpus_path.read_text()[:200_000])
    main(["prepare", "--source", str(small), "--out", str(out), "--val_fraction", "0.25"])
    assert TokenStore(out).manifest["sources"][0]["path"] == str(small)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


# ---- bad input: one line, nothing written ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"ROMEO:\nhello\x00\x00\x00world\n", "line 2 holds NUL bytes"),
        (b"\x00" * 4096, "line 1 holds NUL bytes"),
        (b"ROMEO:\nO caf\xe9!\n", "line 2 is not UTF-8"),
        (b"", "holds no text"),
    ],
)
def test_a_source_that_is_not_text_is_one_line_and_writes_nothing(tmp_path, content, named):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    message = one_line_error("prepare", "--source", str(bad), "--out", str(tmp_path / "store"))
    assert f"source {bad} {named}" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.txt"]


def test_a_missing_text_field_names_the_fields_there_are(tmp_path):
    source = write_source("jsonl", tmp_path)
    message = one_line_error("prepare", "--source", source, "--out", str(tmp_path / "store"), "--text_field", "body")
    assert "has no field 'body' (it has 'id', 'text'); pass --text_field" in message


def test_a_bpe_size_the_text_cannot_reach_says_what_it_reached(tmp_path):
    source = tmp_path / "small.txt"
    source.write_text("to be or not to be\n" * 50)
    message = one_line_error("prepare", "--source", str(source), "--out", str(tmp_path / "s"), "--tokenizer", "bpe",
                             "--vocab_size", "5000", "--val_fraction", "0.5")
    reached = int(message.split("reached only ")[1].split()[0])
    assert 257 <= reached < 5000 and f"pass vocab_size <= {reached}" in message


def test_overwrite_replaces_only_an_earlier_store(tmp_path):
    source = write_source("jsonl", tmp_path / "src")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    message = one_line_error("prepare", "--source", source, "--out", str(other), "--overwrite", "true")
    assert "replaces only an earlier output of this command" in message and (other / "notes.txt").read_text() == "keep me"
    store = tmp_path / "store"
    main(["prepare", "--source", source, "--out", str(store)])
    assert "already exists" in one_line_error("prepare", "--source", source, "--out", str(store))
    main(["prepare", "--source", source, "--out", str(store), "--overwrite", "true", "--val_fraction", "0.5"])
    assert TokenStore(store).manifest["val_fraction"] == 0.5


@pytest.mark.parametrize("damage", ["truncated", "tokenizer", "manifest", "missing"])
def test_a_damaged_store_is_one_line(shakespeare_store, tmp_path, damage):
    store = tmp_path / "store"
    store.mkdir()
    for path in shakespeare_store.iterdir():
        (store / path.name).write_bytes(path.read_bytes())
    if damage == "truncated":
        data = (store / "train.bin").read_bytes()
        (store / "train.bin").write_bytes(data[: len(data) // 2])
        named = "is damaged: train.bin holds"
    elif damage == "tokenizer":
        described = json.loads((store / "tokenizer.json").read_text())
        vocab = described["model"]["vocab"]
        first, second = list(vocab)[300:302]
        vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: every text encodes otherwise
        (store / "tokenizer.json").write_text(json.dumps(described))
        named = "tokenizer.json does not match the manifest"
    elif damage == "manifest":
        (store / "manifest.json").write_text("{ not json")
        named = "has no readable manifest.json"
    else:
        store = tmp_path / "nowhere"
        named = "does not exist; make it with: python -m picogpt_lightning prepare"
    message = one_line_error("fit", "--config", str(REPO / "configs" / "pretrain_corpus.yaml"), "--data.init_args.path", str(store),
                             "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.accelerator", "cpu")
    assert named in message


def test_fine_tuning_on_a_store_of_another_tokenizer_is_refused(shakespeare_store, tmp_path, corpus_path):
    from picogpt_lightning import PicoGPT, checkpoints

    char = build_tokenizer("char", text=corpus_path.read_text())
    checkpoint = tmp_path / "char.ckpt"
    # as wide as the store's vocabulary, so only the tokenizer differs
    checkpoints.save(str(checkpoint), PicoGPT(tiny_config(vocab_size=384, block_size=16)), char)
    dm = TokenStoreDataModule(str(shakespeare_store), block_size=16, batch_size=2)
    model = LanguageModelModule(init_from=str(checkpoint))
    with pytest.raises(ValueError, match="another tokenizer than the data's") as refused:
        quiet_trainer(max_steps=1).fit(model, datamodule=dm)
    assert "\n" not in str(refused.value)


def test_a_corpus_of_nul_bytes_is_refused_by_the_shakespeare_module_too(tmp_path):
    from picogpt_lightning.data import TinyShakespeareDataModule

    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" * 10_000)
    with pytest.raises(ValueError, match=f"corpus {nul} line 1 holds NUL bytes"):
        TinyShakespeareDataModule(data_path=str(nul)).vocab_size


def test_overwrite_never_replaces_a_file(tmp_path):
    source = write_source("jsonl", tmp_path / "src")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    message = one_line_error("prepare", "--source", source, "--out", str(notes), "--overwrite", "true")
    assert "is a file" in message and notes.read_text() == "keep me"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_store_set_aside_by_a_killed_writer_is_put_back(tmp_path):
    from picogpt_lightning.atomic import write_directory_atomically, writer_tag

    host = writer_tag().split("-", 1)[1]
    aside = tmp_path / f".store.{dead_pid()}-{host}.abc.old"  # killed between its two renames: no store in place
    (aside / "store").mkdir(parents=True)
    (aside / "store" / "manifest.json").write_text("the previous store")
    staging = tmp_path / f".store.{dead_pid()}-{host}.def.partial"
    staging.mkdir()
    elsewhere = tmp_path / f".store.{dead_pid()}-another_host.ghi.partial"  # a live writer on another machine, maybe
    elsewhere.mkdir()

    def fail(staging):
        raise OSError(28, "No space left on device")

    with pytest.raises(ValueError, match="No space left"):
        write_directory_atomically(str(tmp_path / "store"), fail)
    assert (tmp_path / "store" / "manifest.json").read_text() == "the previous store"
    assert sorted(path.name for path in tmp_path.iterdir()) == [elsewhere.name, "store"]


def test_ranks_starting_at_once_make_one_cached_store(tmp_path, corpus_path):
    script = (
        "from picogpt_lightning.data import TinyShakespeareDataModule\n"
        f"print(TinyShakespeareDataModule(data_path={str(corpus_path)!r}, tokenizer='bpe', vocab_size=300).vocab_size)\n"
    )
    env = {**os.environ, "PICOGPT_CACHE": str(tmp_path / "cache")}
    ranks = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0, 0], [err[-500:] for _, err in results]
    assert [out.strip() for out, _ in results] == ["300"] * 3
    stores = sorted(path.name for path in (tmp_path / "cache" / "stores").iterdir())
    assert len(stores) == 2 and stores[1] == stores[0] + ".lock"  # one store, and its lock file
