"""Bad input is one line, and settings that would train wrongly without a word are refused.

Each class of input: text that is not UTF-8 wherever the project reads text, a checkpoint file
that holds no checkpoint, a device this machine lacks, Trainer arguments out of range, a stage
without the data it needs, data without a single completion token, a validation that never
comes. Each is exercised through `picogpt_lightning.cli.main` in this process (its SystemExit
carries the line Python prints to stderr, and the status is 1); a subprocess checks the
real stderr and exit status.
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from picogpt_lightning import PicoGPT
from picogpt_lightning.cli import main
from picogpt_lightning.data import InstructionDataModule, PreferenceDataModule
from picogpt_lightning.errors import UserError
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.trainer_checks import check_trainer_arguments
from test_preference_data import sft_cli_args, tiny_char_checkpoint, write_jsonl
from test_reliability import environment, write_config
from tiny_training import quiet_trainer, tiny_config, tiny_datamodule

NOT_UTF8 = "ROMEO:\nO caf\u00e9, caf\u00e9!\n".encode("latin-1")  # é as one Latin-1 byte: not UTF-8
PAIR = {"prompt": "ROMEO:\nBut soft", "completion": ", what light"}


def one_line_error(*args: str) -> str:
    """The error line `main(args)` exits with (Python prints it to stderr and exits 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def not_utf8(path) -> str:
    path.write_bytes(NOT_UTF8)
    return str(path)


# ---- text that is not UTF-8 ----------------------------------------------------------------------


def sft_args(tmp_path, corpus_path, *more):
    return sft_cli_args(tmp_path, corpus_path, tiny_char_checkpoint(tmp_path, corpus_path)) + list(more)


@pytest.mark.parametrize("where", ["data_path", "val_data_path"])
def test_a_jsonl_file_that_is_not_utf8_is_named_with_its_line(tmp_path, corpus_path, where):
    good = write_jsonl(tmp_path / "good.jsonl", [PAIR] * 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(PAIR).encode() + b"\n" + NOT_UTF8.replace(b"\n", b" ") + b"\n")
    paths = {"data_path": str(bad), "val_data_path": good} if where == "data_path" else {"data_path": good, "val_data_path": str(bad)}
    message = one_line_error(*sft_args(tmp_path, corpus_path, *[f"--data.init_args.{k}={v}" for k, v in paths.items()]))
    assert f"{bad} line 2 is not UTF-8" in message


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path):
    bad = not_utf8(tmp_path / "prompts.txt")
    assert f"{bad} line 2 is not UTF-8" in one_line_error("generate", "--ckpt", "unread.ckpt", "--prompts_file", bad)


def test_a_corpus_that_is_not_utf8_is_named_wherever_it_is_given(tmp_path, corpus_path, monkeypatch):
    bad = not_utf8(tmp_path / "my_text.txt")
    config = write_config(tmp_path, bad)  # the data module's data_path: the corpus, or your own text
    assert f"corpus {bad} line 2 is not UTF-8" in one_line_error("fit", "--config", str(config))
    monkeypatch.setenv("PICOGPT_DATA", bad)  # the corpus found through the environment
    assert f"corpus {bad} line 2 is not UTF-8" in one_line_error("fit", "--config", str(config), "--data.init_args.data_path=null")
    # the corpus that SFT and DPO derive their pairs from
    message = one_line_error(*sft_args(tmp_path, corpus_path, f"--data.init_args.corpus_path={bad}"))
    assert f"corpus {bad} line 2 is not UTF-8" in message


def test_a_yaml_config_that_is_not_utf8_is_named(tmp_path, corpus_path):
    bad = not_utf8(tmp_path / "recipe.yaml")
    config = write_config(tmp_path, corpus_path)
    assert f"config {bad} line 2 is not UTF-8" in one_line_error("fit", "--config", str(config), "--config", bad)
    assert f"config {bad} line 2 is not UTF-8" in one_line_error("merge", "--config", bad)
    assert not (tmp_path / "runs").exists()


# ---- a checkpoint file that holds no checkpoint -------------------------------------------------


def test_a_checkpoint_file_holding_no_dict_is_one_line_everywhere(tmp_path, corpus_path):
    path = tmp_path / "odd.ckpt"
    config = str(write_config(tmp_path, corpus_path))
    reads = {  # each way a command reads a checkpoint: checkpoints.load, and Lightning's resume
        "generate": ["generate", "--ckpt", str(path), "--prompt", "ROMEO:"],
        "resume": ["fit", "--config", config, "--ckpt_path", str(path)],
        "export": ["export", "--ckpt", str(path), "--out", str(tmp_path / "hf")],
        "init_from": ["fit", "--config", config, "--model.init_args.init_from", str(path)],
    }
    for contents in ([1, 2, 3], torch.zeros(3), "text"):
        torch.save(contents, path)
        for name, args in reads.items():
            if isinstance(contents, list) or name in ("generate", "resume"):
                assert f"{path} holds a {type(contents).__name__}" in one_line_error(*args), name
    assert not (tmp_path / "hf").exists() and not (tmp_path / "runs").exists()


# ---- a device this machine lacks ----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, corpus_path):
    assert "no CUDA device" in one_line_error("generate", "--ckpt", "unread.ckpt", "--prompt", "a", "--device", "cuda")
    config = str(write_config(tmp_path, corpus_path))
    assert "trainer:" in one_line_error("fit", "--config", config, "--trainer.accelerator", "cuda")


def test_a_cuda_index_past_the_machines_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    message = one_line_error("generate", "--ckpt", "unread.ckpt", "--prompt", "a", "--device", "cuda:7")
    assert "--device cuda:7" in message and "1 cuda device" in message and "cuda:0" in message


@pytest.mark.parametrize("device, expected", [("mps", "no mps device"), ("meta", "cannot run"), ("gpu9", "not a torch device")])
def test_other_absent_or_unusable_devices_are_refused(device, expected):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    message = one_line_error("generate", "--ckpt", "unread.ckpt", "--prompt", "a", "--device", device)
    assert device in message and expected in message


# ---- Trainer arguments out of range -------------------------------------------------------------

# one value out of range for each argument, through the command line; more values of each below
OUT_OF_RANGE = [
    ("accumulate_grad_batches", "0"), ("val_check_interval", "0"), ("check_val_every_n_epoch", "0"),
    ("log_every_n_steps", "-1"), ("max_steps", "-2"), ("max_epochs", "0"), ("min_steps", "-1"),
    ("num_sanity_val_steps", "-2"), ("limit_train_batches", "1.5"), ("limit_val_batches", "-0.5"),
    ("limit_test_batches", "-1"), ("limit_predict_batches", "2.0"),
]
MORE_OUT_OF_RANGE = [
    ("accumulate_grad_batches", -2), ("val_check_interval", 0.0), ("val_check_interval", -5),
    ("val_check_interval", 1.5), ("max_steps", 0), ("max_epochs", -3), ("limit_train_batches", -1),
    ("gradient_clip_val", -0.5),
]


@pytest.mark.parametrize("name, value", OUT_OF_RANGE)
def test_trainer_arguments_out_of_range_are_one_line_before_anything_is_made(tmp_path, corpus_path, name, value):
    message = one_line_error("fit", "--config", str(write_config(tmp_path, corpus_path)), f"--trainer.{name}={value}")
    assert f"--trainer.{name} is {value}; " in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, value", MORE_OUT_OF_RANGE)
def test_more_values_out_of_range_are_refused(name, value):
    with pytest.raises(UserError, match=f"^--trainer.{name} is {value!r}; "):
        check_trainer_arguments("fit", {"max_steps": 40, name: value})


def test_a_negative_clip_value_is_refused_because_it_flips_the_gradient(tmp_path, corpus_path):
    message = one_line_error("fit", "--config", str(write_config(tmp_path, corpus_path)), "--trainer.gradient_clip_val=-1")
    assert "flips the gradient's sign" in message
    # in Python too, before the first optimizer step changes anything
    module = LanguageModelModule(tiny_config(), warmup_steps=0)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(UserError, match="gradient_clip_val -1"):
        quiet_trainer(max_steps=2, gradient_clip_val=-1).fit(module, datamodule=tiny_datamodule(corpus_path, 4, 16))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_validation_interval_past_an_epoch_is_refused(tmp_path, corpus_path):
    # (past the run's last step, counted over the run, it validates at the last step: tests/test_faults_runs.py)
    config = str(write_config(tmp_path, corpus_path))
    # counted per epoch (96 windows of 4: 24 batches), Lightning's refusal once fit starts is one line too
    message = one_line_error("fit", "--config", config, "--trainer.val_check_interval=30", "--trainer.check_val_every_n_epoch=1")
    assert "val_check_interval" in message and "(24)" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("subcommand, trainer", [
    ("fit", dict(max_steps=40, accumulate_grad_batches=2, val_check_interval=80, check_val_every_n_epoch=None)),
    ("fit", dict(max_steps=40, val_check_interval=500, check_val_every_n_epoch=None, limit_val_batches=0)),
    ("fit", dict(max_steps=-1, max_epochs=3, val_check_interval=0.25, check_val_every_n_epoch=1)),
    ("fit", dict(max_steps=40, val_check_interval=1.0, gradient_clip_val=0, limit_train_batches=1.0, log_every_n_steps=0)),
    ("validate", dict(max_steps=0, limit_val_batches=0.5, num_sanity_val_steps=-1)),
], ids=["accumulated", "no-validation", "fraction", "edges", "validate"])
def test_settings_in_range_pass(subcommand, trainer):
    check_trainer_arguments(subcommand, trainer)  # raises on a refusal


# ---- a stage without the data it needs ----------------------------------------------------------


def test_predict_and_test_without_their_data_say_what_to_pass(tmp_path, corpus_path):
    config = write_config(tmp_path, corpus_path)
    message = one_line_error("predict", "--config", str(config))
    assert "predict needs data with a predict_dataloader" in message and "generate" in message
    no_data = yaml.safe_load(config.read_text())
    del no_data["data"]
    config.write_text(yaml.safe_dump(no_data))
    for subcommand in ("test", "validate"):  # no data at all: the parser names the argument to pass
        assert f"required: {subcommand}.data" in one_line_error(subcommand, "--config", str(config))


# ---- data without a single completion token -----------------------------------------------------


def test_sft_data_whose_completions_are_all_empty_is_refused_naming_the_file(tmp_path, corpus_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": PAIR["prompt"], "completion": ""}] * 8)
    message = one_line_error(*sft_args(tmp_path, corpus_path, f"--data.init_args.data_path={empty}"))
    assert f"every completion of the train split ({empty})" in message and "non-empty" in message
    assert not (tmp_path / "checkpoints").exists()  # no best.ckpt chosen on a NaN


def preference_data(tmp_path, corpus_path, train, val) -> PreferenceDataModule:
    data = PreferenceDataModule(
        data_path=write_jsonl(tmp_path / "train.jsonl", train), val_data_path=write_jsonl(tmp_path / "val.jsonl", val),
        tokenizer="char", corpus_path=str(corpus_path), max_length=32, cache_dir=str(tmp_path / "hf"),
    )
    data.setup("fit")
    return data


def test_dpo_data_without_one_chosen_token_and_an_empty_val_split_are_refused(tmp_path, corpus_path):
    pair = {"prompt": "KING:\nWe", "chosen": " shall", "rejected": " will not"}
    no_chosen = preference_data(tmp_path, corpus_path, [{**pair, "chosen": ""}] * 4, [pair])
    with pytest.raises(UserError, match=r"every chosen completion of the train split \(.*train.jsonl\) is empty"):
        no_chosen.train_dataset
    empty_val = preference_data(tmp_path, corpus_path, [pair] * 4, [{**pair, "chosen": "", "rejected": ""}])
    with pytest.raises(UserError, match=r"of the val split \(.*val.jsonl\) is empty"):
        empty_val.train_dataset
    # one completion token is enough: the check refuses nothing that trains
    one = preference_data(tmp_path, corpus_path, [{**pair, "chosen": ""}] * 3 + [{**pair, "chosen": "s"}], [pair])
    assert len(one.train_dataset) == 4
    sft = InstructionDataModule(data_path=write_jsonl(tmp_path / "sft.jsonl", [PAIR] * 3), val_data_path=str(tmp_path / "sft.jsonl"),
                                tokenizer="char", corpus_path=str(corpus_path), max_length=32, cache_dir=str(tmp_path / "hf"))
    sft.setup("fit")
    assert len(sft.train_dataset) == 3


# ---- the real stderr and exit status ------------------------------------------------------------


def test_the_command_prints_exactly_one_line_and_exits_1(tmp_path, corpus_path):
    config = write_config(tmp_path, corpus_path)
    result = subprocess.run(
        [sys.executable, "-m", "picogpt_lightning", "fit", "--config", str(config), "--trainer.accumulate_grad_batches=0"],
        capture_output=True, text=True, cwd=tmp_path, env=environment(), timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "error: --trainer.accumulate_grad_batches is 0; it must be an int >= 1 (1: one batch per optimizer step)"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["command line", "config file", "nested file"])
def test_a_vocab_size_that_disagrees_with_the_tokenizer_is_refused_wherever_it_is_written(tmp_path, corpus_path, where):
    extra = []
    if where == "config file":
        config = write_config(tmp_path, corpus_path, model={"config": {
            "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 40}})
    else:
        config = write_config(tmp_path, corpus_path)
        if where == "command line":
            extra = ["--model.init_args.config.vocab_size=40"]
        else:
            nested = tmp_path / "model_config.yaml"
            nested.write_text(yaml.safe_dump({"block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 40}))
            extra = ["--model.init_args.config", str(nested)]
    message = one_line_error("fit", "--config", str(config), *extra)
    assert "model config vocab_size is 40 but the tokenizer has 65 tokens" in message
