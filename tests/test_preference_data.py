"""Prompt/completion data through `datasets`, the pairs derived from tiny_shakespeare, and SFT on completions only."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from picogpt_lightning import PicoGPT, PicoGPTConfig, checkpoints
from picogpt_lightning.cli import main as cli_main
from picogpt_lightning.data import InstructionDataModule, PreferenceDataModule, build_tokenizer
from picogpt_lightning.data.pairs import shakespeare_pairs
from picogpt_lightning.data.splits import speech_spans, split_point
from picogpt_lightning.data.truncate import truncate
from picogpt_lightning.modules import LanguageModelModule

REPO_ROOT = Path(__file__).resolve().parent.parent
PAIRS = [
    {"prompt": "ROMEO:\nBut soft", "chosen": ", what light", "rejected": " the king is dead"},
    {"prompt": "JULIET:\nO", "chosen": " Romeo, Romeo!", "rejected": "ld man"},
    {"prompt": "KING:\nWe", "chosen": " shall", "rejected": " will not"},
]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_jsonl_goes_through_datasets_and_the_collator(tmp_path, corpus_path):
    train = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    val = write_jsonl(tmp_path / "val.jsonl", PAIRS[:1])
    data = PreferenceDataModule(
        data_path=train, val_data_path=val, tokenizer="char", corpus_path=str(corpus_path), max_length=64,
        batch_size=3, cache_dir=str(tmp_path / "hf"),
    )
    data.setup("fit")
    assert len(data.train_dataset) == 3 and len(data.val_dataset) == 1
    assert sorted(data.train_dataset["index"]) == [0, 1, 2] and data.val_dataset["index"] == [3]
    assert any((tmp_path / "hf").iterdir())  # datasets cached the file there, not in the user's cache

    tokenizer = data.tokenizer
    batch = next(iter(data.ordered_dataloaders()[0]))  # the train split, in file order
    assert batch["input_ids"].shape[0] == 6  # every chosen row, then every rejected row
    for row in range(6):
        pair = PAIRS[row % 3]
        completion = pair["chosen"] if row < 3 else pair["rejected"]
        prompt, completion = tokenizer.encode(pair["prompt"]), tokenizer.encode(completion)
        sequence = prompt + completion
        n = len(sequence) - 1
        assert batch["input_ids"][row, :n].tolist() == sequence[:-1]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        # -100 where the label is a prompt token or padding; the completion's tokens elsewhere
        expected = [-100] * (len(prompt) - 1) + completion + [-100] * (batch["labels"].shape[1] - n)
        assert batch["labels"][row].tolist() == expected
    assert batch["index"].tolist() == [0, 1, 2]


def test_truncation_cuts_the_prompt_first_then_the_completions():
    prompt, chosen, rejected = list(range(10)), list(range(100, 106)), list(range(200, 203))
    assert truncate(prompt, [chosen, rejected], max_length=16, max_prompt_length=8) == (prompt, [chosen, rejected])
    # too long: the prompt keeps its last 8 tokens; that leaves room for all of chosen
    assert truncate(prompt, [chosen, rejected], max_length=14, max_prompt_length=8) == (prompt[-8:], [chosen, rejected])
    # still too long after the prompt's cut: completions are cut to the room left
    assert truncate(prompt, [chosen, rejected], max_length=11, max_prompt_length=8) == (prompt[-8:], [chosen[:3], rejected])


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ('{"prompt": "a", "chosen": "b"}\n', "lacks the text column(s) ['rejected']"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n', "line 2 is not JSON"),
        ('["a", "b", "c"]\n', "not a JSON object"),
    ],
)
def test_bad_jsonl_is_a_one_line_error(tmp_path, corpus_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    data = PreferenceDataModule(data_path=str(path), tokenizer="char", corpus_path=str(corpus_path), max_length=32)
    with pytest.raises(ValueError) as error:
        data.setup("fit")
    assert message in str(error.value) and "\n" not in str(error.value) and "bad.jsonl" in str(error.value)


def test_bad_jsonl_through_the_cli_is_one_line(tmp_path, corpus_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    args = sft_cli_args(tmp_path, corpus_path, tiny_char_checkpoint(tmp_path, corpus_path))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args + ["--data", "picogpt_lightning.data.PreferenceDataModule", "--data.init_args.data_path", path])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "lacks the text column(s) ['chosen', 'rejected']" in text and "\n" not in text


def test_shakespeare_pairs_keep_validation_text_apart(corpus_path):
    text = corpus_path.read_text()
    cut = split_point(text, 0.1)
    for split in ("train", "val"):
        pairs = shakespeare_pairs(text, split, prompt_chars=32, completion_chars=32)
        assert len(pairs) > (3000 if split == "train" else 300)
        for pair in pairs:
            start = text.find(pair["prompt"] + pair["chosen"])  # chosen is the prompt's true continuation
            assert start >= 0 and len(pair["prompt"]) == len(pair["chosen"]) == len(pair["rejected"]) == 32
            assert (start < cut) == (split == "train")
            if split == "val":  # rejected text comes from the validation part too
                assert text.find(pair["rejected"], cut) >= 0
        assert sum(pair["chosen"] != pair["rejected"] for pair in pairs) == len(pairs)


def test_several_rejected_per_prompt_come_from_different_speeches_alike_in_length(corpus_path):
    text, k = corpus_path.read_text(), 3
    cut = split_point(text, 0.1)
    for split in ("train", "val"):
        # the speeches a pair can come from, ranked by length as the builder ranks them
        speeches = [(a, b) for a, b in speech_spans(text) if (a < cut) == (split == "train") and b - a >= 64]
        rank = {start: i for i, (start, _) in enumerate(sorted(speeches, key=lambda s: (s[1] - s[0], s[0])))}
        stretch_of = {}  # rejected text -> the speeches whose characters 32..64 it is
        for start, _ in speeches:
            stretch_of.setdefault(text[start + 32 : start + 64], []).append(start)

        pairs = shakespeare_pairs(text, split, prompt_chars=32, completion_chars=32, rejected_per_prompt=k)
        single = shakespeare_pairs(text, split, prompt_chars=32, completion_chars=32)
        assert len(pairs) == k * len(speeches) == k * len(single)
        groups = {}
        for pair in pairs:
            groups.setdefault((pair["prompt"], pair["chosen"]), []).append(pair["rejected"])
        assert len(groups) == len(speeches)
        for pair in single:  # the one rejected of the default is among the k
            assert pair["rejected"] in groups[(pair["prompt"], pair["chosen"])]
        for (prompt, chosen), rejected in groups.items():
            own = text.find(prompt + chosen)
            assert own in rank and len(rejected) == k
            # k different speeches of the same split, never the prompt's own
            sources = [min(stretch_of[r], key=lambda start: abs(rank[start] - rank[own])) for r in rejected]
            assert len(set(sources)) == k and own not in sources
            # the k nearest in length order: no farther than the k-th nearest rank can be
            distances = sorted(abs(rank[s] - rank[own]) for s in sources)
            possible = sorted(abs(r - rank[own]) for r in range(len(speeches)) if r != rank[own])
            assert distances[-1] <= possible[k - 1]


def test_prompts_per_speech_cuts_each_opening_shorter_by_a_completion(corpus_path):
    text, cuts = corpus_path.read_text(), 4
    cut = split_point(text, 0.1)
    starts = [a for a, b in speech_spans(text) if a >= cut and b - a >= 40]  # the validation speeches a pair uses
    single = shakespeare_pairs(text, "val", prompt_chars=32, completion_chars=8)
    pairs = shakespeare_pairs(text, "val", prompt_chars=32, completion_chars=8, prompts_per_speech=cuts)
    assert len(pairs) == cuts * len(single) == cuts * len(starts)
    for i, (default, own) in enumerate(zip(single, starts)):  # both in corpus order
        group = sorted(pairs[i * cuts : (i + 1) * cuts], key=lambda pair: len(pair["prompt"]))
        assert [len(pair["prompt"]) for pair in group] == [8, 16, 24, 32] and group[-1] == default
        # each prompt is the speech's opening, chosen the next 8 characters
        assert all(pair["prompt"] + pair["chosen"] == text[own : own + len(pair["prompt"]) + 8] for pair in group)
        # every cut's rejected is the same stretch of one other validation speech
        others = [o for o in starts if o != own and all(
            pair["rejected"] == text[o + len(pair["prompt"]) : o + len(pair["prompt"]) + 8] for pair in group)]
        assert others
    with pytest.raises(ValueError, match="prompts_per_speech 5 would cut prompts to 0 characters"):
        shakespeare_pairs(text, "val", prompt_chars=32, completion_chars=8, prompts_per_speech=5)


def test_more_training_pairs_leave_the_held_out_pairs_as_they_are(tmp_path, corpus_path):
    datasets = {}
    for k in (1, 3):
        data = PreferenceDataModule(tokenizer="char", corpus_path=str(corpus_path), max_length=65, prompt_chars=56,
                                    completion_chars=8, rejected_per_prompt=k, prompts_per_speech=k,
                                    cache_dir=str(tmp_path / "hf"))
        data.setup("fit")
        datasets[k] = data
    assert len(datasets[3].train_dataset) == 3 * 3 * len(datasets[1].train_dataset)
    assert datasets[3].val_dataset.to_list() != [] and [
        {key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in datasets[3].val_dataset
    ] == [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in datasets[1].val_dataset]
    for knob in ("rejected_per_prompt", "prompts_per_speech"):
        with pytest.raises(ValueError, match=f"{knob} must be a positive int"):
            PreferenceDataModule(tokenizer="char", **{knob: 0})


# ---- supervised fine-tuning -------------------------------------------------------------------


def test_sft_loss_counts_completion_tokens_only(tmp_path, corpus_path):
    records = [{"prompt": pair["prompt"], "completion": pair["chosen"]} for pair in PAIRS]
    data = InstructionDataModule(
        data_path=write_jsonl(tmp_path / "sft.jsonl", records), val_data_path=write_jsonl(tmp_path / "v.jsonl", records),
        tokenizer="char", corpus_path=str(corpus_path), max_length=32, batch_size=3, cache_dir=str(tmp_path / "hf"),
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    tokenizer = data.tokenizer
    module = LanguageModelModule(PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_embd=16, n_head=2))
    module.eval()
    logits = module(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.allclose(module.compute_losses(batch)[0]["loss"], loss.detach())

    terms = []  # by hand: -log p(completion token | everything before it), completion tokens only
    for row, record in enumerate(records):
        prompt, completion = tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"])
        sequence = prompt + completion
        log_probs = torch.log_softmax(logits[row].detach(), dim=-1)
        terms += [-log_probs[k - 1, sequence[k]] for k in range(len(prompt), len(sequence))]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)

    # the prompt's positions get no gradient at all: changing what they predict changes nothing
    loss.backward()
    for row, record in enumerate(records):
        prompt_positions = len(tokenizer.encode(record["prompt"])) - 1
        assert logits.grad[row, :prompt_positions].abs().sum() == 0
        assert logits.grad[row, prompt_positions].abs().sum() > 0


def tiny_char_checkpoint(directory: Path, corpus_path: Path) -> str:
    tokenizer = build_tokenizer("char", text=corpus_path.read_text())
    torch.manual_seed(0)
    model = PicoGPT(PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=24, n_layer=1, n_embd=16, n_head=2))
    path = str(directory / "pretrained.pt")
    checkpoints.save(path, model, tokenizer=tokenizer)
    return path


def sft_cli_args(tmp_path, corpus_path, init_from) -> list:
    return [
        "fit", "--config", str(REPO_ROOT / "configs" / "sft.yaml"),
        "--model.init_args.init_from", init_from,
        "--data.init_args.corpus_path", str(corpus_path),
        "--data.init_args.batch_size", "8",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--checkpoint.dirpath", str(tmp_path / "checkpoints"),
    ]


def test_sft_recipe_takes_architecture_and_tokenizer_from_the_checkpoint(tmp_path, corpus_path):
    from picogpt_lightning.lightning_cli import run_lightning

    start = tiny_char_checkpoint(tmp_path, corpus_path)
    cli = run_lightning(sft_cli_args(tmp_path, corpus_path, start))
    assert cli.model.config == PicoGPT.from_checkpoint(start).config
    assert cli.datamodule.tokenizer is cli.model.tokenizer
    # max_length defaults to what the model reads: block_size + 1 tokens per sample
    assert max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in cli.datamodule.train_dataset) <= 25
    assert "val/loss" in cli.trainer.callback_metrics
    trained = PicoGPT.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert not torch.equal(trained.lm_head.weight, PicoGPT.from_checkpoint(start).lm_head.weight)
