"""Training through the CLI and the shared base: schedule, optimizer groups, checkpoints, errors."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.lightning_cli import run_lightning
from picogpt_lightning.data import Tokenizer
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.modules.base import warmup_cosine

REPO_ROOT = Path(__file__).resolve().parent.parent
PRETRAIN_CPU = REPO_ROOT / "configs" / "pretrain_cpu.yaml"


def nanogpt_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT's get_lr, written out as it stands in its train.py."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 1000, 1999, 2000, 2500])
def test_schedule_matches_nanogpt(step):
    ours = 1e-3 * warmup_cosine(step, warmup_steps=100, decay_steps=2000, min_ratio=0.1)
    assert ours == pytest.approx(nanogpt_lr(step, 1e-3, 1e-4, 100, 2000), rel=1e-9)


def test_weight_decay_only_on_matrices():
    module = LanguageModelModule(PicoGPTConfig(vocab_size=20, block_size=8, n_layer=1, n_embd=16, n_head=2))
    module.trainer = None  # configure_optimizers reads the decay horizon from lr_decay_steps
    module.lr_decay_steps = 10
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])  # RMSNorm gains
    named = dict(module.named_parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def tiny_fit_args(save_dir: Path, *extra: str) -> list:
    return [
        "fit",
        "--config", str(PRETRAIN_CPU),
        "--model.init_args.config.n_layer", "1",
        "--model.init_args.config.n_embd", "32",
        "--model.init_args.config.n_head", "2",
        "--model.init_args.warmup_steps", "2",
        "--data.init_args.batch_size", "4",
        "--data.init_args.val_samples", "16",
        "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_path):
    save_dir = tmp_path_factory.mktemp("runs")
    cli = run_lightning(tiny_fit_args(save_dir, "--data.init_args.data_path", str(corpus_path)))
    log_dir = Path(cli.trainer.log_dir)
    return cli, log_dir


def test_cli_fit_writes_checkpoints_events_and_config(tiny_run):
    cli, log_dir = tiny_run
    assert cli.trainer.global_step == 6
    assert (log_dir / "checkpoints" / "best.ckpt").is_file()
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "config.yaml").is_file()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/ppl", "lr/weight_decay", "lr/no_weight_decay"} <= set(tags)
    assert len(events.Scalars("train/loss")) == 6
    assert cli.model.config.vocab_size == 65  # linked from the char tokenizer


def test_val_perplexity_is_exp_of_val_loss(tiny_run):
    cli, _ = tiny_run
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/ppl"]) == pytest.approx(math.exp(float(metrics["val/loss"])), rel=1e-4)


def test_from_checkpoint_gives_identical_logits(tiny_run):
    cli, log_dir = tiny_run
    checkpoint = str(log_dir / "checkpoints" / "last.ckpt")
    trained = cli.model.model.eval()
    loaded = PicoGPT.from_checkpoint(checkpoint).eval()
    # a second path: Lightning's own loader of the whole module
    module = LanguageModelModule.load_from_checkpoint(checkpoint).eval()
    ids = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        expected = trained(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(module.model(ids).logits, expected, atol=0, rtol=0)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    assert tokenizer.decode(tokenizer.encode("ROMEO:\nO, she doth teach")) == "ROMEO:\nO, she doth teach"
    assert module.tokenizer.vocab_size == 65


def test_speeches_mode_with_dynamic_padding_trains(tmp_path, corpus_path):
    cli = run_lightning(
        tiny_fit_args(
            tmp_path,
            "--data.init_args.data_path", str(corpus_path),
            "--data.init_args.mode", "speeches",
            "--data.init_args.group_by_length", "true",
            "--trainer.max_steps", "3",
        )
    )
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def run_cli(*args: str, env_corpus: Path | None = None):
    env = None
    if env_corpus is not None:
        import os

        env = {**os.environ, "PICOGPT_DATA": str(env_corpus)}
    return subprocess.run(
        [sys.executable, "-m", "picogpt_lightning", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("fit", "validate", "test", "predict", "generate", "export"):
        assert f"  {name} " in result.stdout


def test_bad_config_value_is_one_line_error(tmp_path, corpus_path):
    result = run_cli(*tiny_fit_args(tmp_path, "--model.init_args.config.n_head", "3"), env_corpus=corpus_path)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: PicoGPTConfig.n_embd (32) must be divisible by n_head (3)")
    assert "Traceback" not in result.stderr


def test_missing_corpus_is_one_line_error(tmp_path):
    missing = tmp_path / "nowhere.txt"
    result = run_cli(*tiny_fit_args(tmp_path, "--data.init_args.data_path", str(missing)))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr.strip().splitlines()[-1]


def test_model_smaller_than_tokenizer_vocab_is_refused(tmp_path, corpus_path):
    import lightning as L

    from picogpt_lightning.data import TinyShakespeareDataModule

    data = TinyShakespeareDataModule(data_path=str(corpus_path), block_size=8, batch_size=2, val_samples=4)
    module = LanguageModelModule(PicoGPTConfig(vocab_size=40, block_size=8, n_layer=1, n_embd=16, n_head=2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="the tokenizer has 65 tokens but the model's vocab_size is 40"):
        trainer.fit(module, data)


def test_data_block_size_larger_than_model_is_refused(tmp_path, corpus_path):
    result = run_cli(*tiny_fit_args(tmp_path, "--data.init_args.block_size", "128"), env_corpus=corpus_path)
    assert result.returncode != 0
    assert "the data's block_size (128) exceeds the model's (64)" in result.stderr.strip().splitlines()[-1]


def test_init_from_starts_fine_tuning_at_the_checkpoint(tiny_run):
    cli, log_dir = tiny_run
    checkpoint = str(log_dir / "checkpoints" / "last.ckpt")
    config = PicoGPTConfig.from_dict({**cli.model.config.to_dict(), "neftune_noise_alpha": 5.0})
    fine_tune = LanguageModelModule(config, init_from=checkpoint)
    fine_tune.setup("fit")  # a run starts: the weights are read now
    fine_tune.eval()
    ids = torch.randint(0, 65, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(fine_tune.model(ids).logits, cli.model.model.eval()(ids).logits, atol=0, rtol=0)
    mismatched = LanguageModelModule(PicoGPTConfig.from_dict({**config.to_dict(), "n_layer": 2}), init_from=checkpoint)
    with pytest.raises(ValueError, match="does not match the model config"):
        mismatched.setup("fit")


def test_a_fine_tuned_run_loads_without_its_base_checkpoint(tiny_run, tmp_path, corpus_path):
    import shutil

    from tiny_training import quiet_trainer, tiny_datamodule

    cli, log_dir = tiny_run
    base = tmp_path / "base.ckpt"
    shutil.copy(log_dir / "checkpoints" / "last.ckpt", base)
    fine_tune = LanguageModelModule(cli.model.config, init_from=str(base), lr_decay_steps=1)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(fine_tune, datamodule=tiny_datamodule(corpus_path, batch_size=2, train_samples=4))
    trainer.save_checkpoint(tmp_path / "fine_tuned.ckpt")
    base.unlink()  # the base moved away

    loaded = LanguageModelModule.load_from_checkpoint(tmp_path / "fine_tuned.ckpt")
    assert loaded.hparams.init_from == str(base)  # kept as a record of where the run started
    for name, tensor in fine_tune.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, atol=0, rtol=0)


def test_a_run_without_a_length_asks_for_max_steps(corpus_path):
    from tiny_training import quiet_trainer, tiny_config, tiny_datamodule

    trainer = quiet_trainer(max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="set trainer max_steps or model lr_decay_steps"):
        trainer.fit(LanguageModelModule(tiny_config()), datamodule=tiny_datamodule(corpus_path, batch_size=2))
