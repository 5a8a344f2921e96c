"""TinyShakespeareDataModule: nanoGPT windows, speeches, splits, length grouping, determinism, DDP sharding."""

import re

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from picogpt_lightning.data import TinyShakespeareDataModule, build_tokenizer
from picogpt_lightning.data.samplers import LengthGroupedSampler, ResumableSampler

SPEAKER_LINE = re.compile(r"[A-Za-z][^\n]*:\n")  # "First Citizen:\n" opens every turn


@pytest.fixture(scope="module")
def full_text(corpus_path):
    return corpus_path.read_text()


@pytest.fixture(scope="module")
def small(full_text, tmp_path_factory):
    """The first 80k characters (about 900 speeches), so each test encodes little."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(full_text[:80_000])
    return path


def make(path, **kwargs):
    dm = TinyShakespeareDataModule(data_path=str(path), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def decoded(dm, dataset):
    return [dm.tokenizer.decode(dataset[i]) for i in range(len(dataset))]


def first_batch(loader):
    return next(iter(loader))


def mask_of(batch):
    """The batch's attention mask; a batch without one has no padding (every sample was truncated)."""
    return batch.get("attention_mask", torch.ones_like(batch["input_ids"]))


def test_vocab_size_works_before_setup(corpus_path, full_text, monkeypatch):
    monkeypatch.setenv("PICOGPT_DATA", str(corpus_path))
    dm = TinyShakespeareDataModule()  # LightningCLI reads vocab_size right after __init__
    assert dm.vocab_size == 65 == len(set(full_text))
    assert dm.pad_token_id is None
    assert dm.train_dataset is None


def test_blocks_are_contiguous_windows_of_the_right_split(small):
    dm = make(small, block_size=32, batch_size=8, train_samples=40, val_samples=24)
    text = small.read_text()
    cut = int(len(text) * 0.9)  # nanoGPT: data[:int(n * 0.9)] trains
    # char tokens are characters, so token offsets are character positions
    for dataset, base, end in [(dm.train_dataset, 0, cut), (dm.val_dataset, cut, len(text))]:
        for offset, window in zip(dataset.offsets.tolist(), decoded(dm, dataset)):
            start = base + offset
            assert window == text[start : start + 33]
            assert base <= start and start + 33 <= end  # inside its split, so val never overlaps train
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (40, 24)


@pytest.mark.parametrize("kind", ["bpe", "hf_dir"])
def test_blocks_with_subword_tokenizers_are_slices_of_their_split(small, kind, tmp_path):
    text = small.read_text()
    cut = int(len(text) * 0.9)
    if kind == "bpe":
        dm = make(small, tokenizer="bpe", vocab_size=300, block_size=16, batch_size=4, train_samples=20, val_samples=20)
        # trained on the train split only: a second training on exactly that text gives the same merges
        reference = build_tokenizer("bpe", text[:cut], vocab_size=300)
        assert dm.tokenizer.to_dict()["tokenizer_json"] == reference.to_dict()["tokenizer_json"]
    else:
        build_tokenizer("bpe", text, vocab_size=300).hf.save_pretrained(tmp_path)
        dm = make(small, tokenizer=str(tmp_path), block_size=16, batch_size=4, train_samples=20, val_samples=20)
    assert dm.vocab_size == 300 and dm.pad_token_id == dm.tokenizer.eos_token_id
    assert all(window in text[:cut] for window in decoded(dm, dm.train_dataset))
    assert all(window in text[cut:] for window in decoded(dm, dm.val_dataset))
    batch = first_batch(dm.train_dataloader())
    assert batch["input_ids"].shape == (4, 16)


def test_blocks_batches_have_shifted_labels_and_no_mask(small):
    dm = make(small, block_size=32, batch_size=8, train_samples=40, val_samples=24)
    for loader in [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]:
        batch = first_batch(loader)
        assert set(batch) == {"input_ids", "labels"}  # no padding in blocks mode, so no mask to look at
        assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    # nothing dropped: every window is served once per epoch
    assert sum(len(b["input_ids"]) for b in dm.train_dataloader()) == 40


def test_a_batch_of_windows_is_fetched_in_one_go(small):
    dataset = make(small, block_size=32, train_samples=40).train_dataset
    indices = [5, 0, 39, 5, 17]
    expected = torch.stack([dataset[i] for i in indices])  # the one-window path, sample by sample
    assert torch.equal(dataset.__getitems__(indices), expected)


def test_default_window_counts(small):
    dm = make(small, block_size=64)
    train_tokens = int(len(small.read_text()) * 0.9)
    assert len(dm.train_dataset) == train_tokens // 64
    assert len(dm.val_dataset) == 2000


def test_speeches_tile_the_text_and_each_starts_at_a_turn(small):
    dm = make(small, mode="speeches", block_size=4096, batch_size=16)  # no speech is that long: none truncated
    text = small.read_text()
    train, val = decoded(dm, dm.train_dataset), decoded(dm, dm.val_dataset)
    assert "".join(train) + "".join(val) == text  # nothing dropped, nothing repeated
    assert all(SPEAKER_LINE.match(speech) for speech in train + val)
    assert all(speech.endswith("\n\n") for speech in train[:-1] + val[:-1])  # a turn ends at its blank line
    cut = int(len(text) * 0.9)
    train_chars = sum(map(len, train))
    assert cut <= train_chars < cut + max(map(len, train))  # the turn crossing the cut trains whole
    assert len(train) + len(val) == len(re.findall(r"(?:\A|(?<=\n\n))[A-Za-z][^\n]*:\n", text))


def test_speeches_are_truncated_and_dynamically_padded(small):
    dm = make(small, mode="speeches", block_size=24, batch_size=16, pad_to_multiple_of=None)
    text = small.read_text()
    lengths = dm.train_dataset.lengths
    assert max(lengths) == 25 and min(lengths) < 25
    assert all(text.startswith(speech) or f"\n\n{speech}" in text for speech in decoded(dm, dm.val_dataset))
    batch = first_batch(dm.val_dataloader())  # fixed order: the first 16 speeches of val
    real = torch.tensor(dm.val_dataset.lengths[:16]) - 1
    assert batch["input_ids"].shape == (16, int(real.max()))
    assert torch.equal(mask_of(batch).sum(1), real)
    assert bool((batch["labels"][mask_of(batch) == 0] == -100).all())


@pytest.mark.parametrize(("block_size", "widths"), [(128, {64, 128}), (100, {64, 100})])
def test_speech_batches_are_bucketed_to_a_few_widths(small, block_size, widths):
    # a compiled model then meets a few shapes instead of one per batch; never wider than block_size
    dm = make(small, mode="speeches", block_size=block_size, batch_size=8, pad_to_multiple_of=64, group_by_length=True)
    seen = set()
    for batch in dm.train_dataloader():
        width = batch["input_ids"].shape[1]
        seen.add(width)
        real = mask_of(batch).sum(1)
        assert int(real.max()) <= width < int(real.max()) + 64
    assert seen == widths


def padding_fraction(loader):
    masks = [mask_of(batch) for batch in loader]
    return 1 - sum(m.sum() for m in masks).item() / sum(m.numel() for m in masks)


def test_group_by_length_cuts_padding(small):
    random_order = make(small, mode="speeches", block_size=128, batch_size=8, pad_to_multiple_of=None)
    grouped = make(small, mode="speeches", block_size=128, batch_size=8, group_by_length=True, pad_to_multiple_of=None)
    random_padding = padding_fraction(random_order.train_dataloader())
    grouped_padding = padding_fraction(grouped.train_dataloader())
    assert grouped_padding < 0.5 * random_padding


def test_length_grouped_sampler_order():
    lengths = [(7 * i) % 23 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3)  # megabatches of 200
    first = list(sampler)
    assert sorted(first) == list(range(1000))  # a permutation: nothing dropped or repeated
    for start in range(0, 1000, 200):
        group = [lengths[i] for i in first[start : start + 200]]
        assert group == sorted(group, reverse=True)
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=3)) == first
    sampler.set_epoch(0)
    sampler.resume_at(120)  # a resumed epoch continues the same order, once
    assert list(sampler) == first[120:] and list(sampler) == first


def test_same_seed_same_data_other_seed_other_data(small):
    def batches(seed, **kwargs):
        dm = make(small, block_size=16, batch_size=4, train_samples=12, val_samples=8, seed=seed, **kwargs)
        return [first_batch(dm.train_dataloader())["input_ids"], first_batch(dm.val_dataloader())["input_ids"]]

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))
    # val windows do not depend on whether train was built too
    dm = TinyShakespeareDataModule(data_path=str(small), block_size=16, val_samples=8, seed=1)
    dm.setup("validate")
    assert dm.train_dataset is None
    assert torch.equal(first_batch(dm.val_dataloader())["input_ids"][:4], a[1])


def test_shuffled_epochs_differ(small):
    dm = make(small, block_size=16, batch_size=4, train_samples=32)
    loader = dm.train_dataloader()
    first = [b["input_ids"] for b in loader]
    loader.sampler.set_epoch(1)  # Lightning's call at each epoch: the order is a function of seed and epoch
    second = [b["input_ids"] for b in loader]
    assert not torch.equal(torch.cat(first), torch.cat(second))
    assert sorted(map(tuple, torch.cat(first).tolist())) == sorted(map(tuple, torch.cat(second).tolist()))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_two_ranks_split_the_data_disjointly(small, group_by_length):
    dm = make(small, mode="speeches", block_size=64, batch_size=8, group_by_length=group_by_length)
    dataset = dm.train_dataset
    n = len(dataset)
    if group_by_length:  # the sampler shards itself: Lightning keeps a DistributedSampler as it is
        samplers = [LengthGroupedSampler(dataset.lengths, batch_size=8, seed=5, num_replicas=2, rank=r) for r in range(2)]
    else:
        samplers = [ResumableSampler(dataset, seed=5, num_replicas=2, rank=r) for r in range(2)]
        # the same shards as the DistributedSampler Lightning would otherwise inject
        reference = [DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=5) for r in range(2)]
        assert [list(a) for a in samplers] == [list(b) for b in reference]
    for epoch in range(2):
        shards = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
        assert set(shards[0]) | set(shards[1]) == set(range(n))  # every sample reaches a rank
        overlap = len(shards[0]) + len(shards[1]) - n  # DistributedSampler repeats at most one to even out
        assert len(set(shards[0]) & set(shards[1])) == overlap <= 1


class BatchRecorder(L.LightningModule):
    """The smallest language model that lets a Trainer run the datamodule's loaders."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, vocab_size)
        self.first_batches = []

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.first_batches.append(batch["input_ids"])
        logits = self.embedding(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())  # -100 skipped

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_the_datamodule_and_advances_the_sampler_epoch(small):
    dm = TinyShakespeareDataModule(
        data_path=str(small), mode="speeches", block_size=64, batch_size=8, group_by_length=True
    )
    model = BatchRecorder(dm.vocab_size)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.train_dataloader.sampler.epoch == 1  # Lightning called set_epoch
    first, second = model.first_batches
    assert first.shape != second.shape or not torch.equal(first, second)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "lines"}, "mode"),
        ({"block_size": 0}, "block_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0}, "val_fraction"),
        ({"tokenizer": "bpe"}, "vocab_size"),
        ({"tokenizer": "char", "vocab_size": 100}, "vocab_size"),
        ({"train_samples": 0}, "train_samples"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        TinyShakespeareDataModule(**kwargs)
    assert "\n" not in str(info.value)


def test_block_size_too_large_for_the_split(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("ROMEO:\nHello.\n\n" * 10)
    dm = TinyShakespeareDataModule(data_path=str(path), block_size=64)
    with pytest.raises(ValueError, match="block_size"):
        dm.setup("fit")


def test_dataloaders_need_setup(small):
    dm = TinyShakespeareDataModule(data_path=str(small))
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
