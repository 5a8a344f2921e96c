"""What the speed features report and choose: FLOPs per token, ThroughputMonitor's figures, AdamW's set-up."""

import pytest
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from picogpt_lightning.callbacks import PeakFlopsThroughputMonitor, dense_peak_flops
from lightning.pytorch.loggers import Logger
from torch import nn

from picogpt_lightning import PicoGPT
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.modules.base import flops_per_token, positions_in_batch, sequences_in_batch
from tiny_training import BLOCK_SIZE, quiet_trainer, seed_everything, tiny_config, tiny_datamodule


@pytest.mark.parametrize("mlp, groups", [("swiglu", 2), ("gelu", 4)])
def test_flops_per_token_counts_every_matmul_weight_and_attention(mlp, groups):
    config = tiny_config(mlp=mlp, n_query_groups=groups)
    model = PicoGPT(config)
    # independent count: every nn.Linear's weight, the tied lm_head included (it is still a matmul)
    matmul_weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    seq_len = 24
    attention = 12 * config.n_layer * config.n_embd * seq_len  # QK^T and AV: 2 * 2 * T * d forward, x3 with backward

    assert flops_per_token(config, seq_len) == 6 * matmul_weights + attention
    assert flops_per_token(config, seq_len, training=False) * 3 == flops_per_token(config, seq_len)


class MemoryLogger(Logger):
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_throughput_monitor_reports_the_modules_flops(corpus_path):
    seed_everything()
    model = LanguageModelModule(tiny_config(), lr_decay_steps=6)
    logger = MemoryLogger()
    monitor = ThroughputMonitor(batch_size_fn=sequences_in_batch, length_fn=positions_in_batch, window_size=3)
    trainer = quiet_trainer(max_steps=6, logger=logger, log_every_n_steps=1, callbacks=[monitor])
    trainer.fit(model, datamodule=tiny_datamodule(corpus_path, batch_size=4))

    metrics = logger.metrics
    assert metrics["train/device/items_per_sec"] == pytest.approx(metrics["train/device/samples_per_sec"] * BLOCK_SIZE)
    flops_per_sample = BLOCK_SIZE * flops_per_token(model.config, BLOCK_SIZE)
    samples_per_sec = metrics["train/device/samples_per_sec"]
    assert metrics["train/device/flops_per_sec"] == pytest.approx(samples_per_sec * flops_per_sample)
    assert "train/device/mfu" not in metrics  # a CPU has no peak-FLOPs entry in Lightning: no MFU, no error


def test_peak_flops_monitor_reads_the_clock_only_on_logged_steps(corpus_path):
    # Lightning's monitor synchronizes the GPU to read the clock after every batch; this one only on
    # logged steps, so each update must account for the FLOPs of the untimed batches since the last
    seed_everything()
    model = LanguageModelModule(tiny_config(), lr_decay_steps=12)
    logger = MemoryLogger()
    monitor = PeakFlopsThroughputMonitor(batch_size_fn=sequences_in_batch, length_fn=positions_in_batch, window_size=2)
    timed_steps = []
    lightning_update = monitor._update
    monitor._update = lambda trainer, *args: timed_steps.append(trainer.global_step) or lightning_update(trainer, *args)
    trainer = quiet_trainer(
        max_steps=12, logger=logger, log_every_n_steps=3, callbacks=[monitor], limit_val_batches=2, val_check_interval=4
    )
    trainer.fit(model, datamodule=tiny_datamodule(corpus_path, batch_size=4))

    assert timed_steps == [3, 6, 9, 12]  # no clock reading on the other steps, none in validation
    metrics = logger.metrics
    samples_per_sec = metrics["train/device/samples_per_sec"]
    assert metrics["train/device/items_per_sec"] == pytest.approx(samples_per_sec * BLOCK_SIZE)
    flops_per_sample = BLOCK_SIZE * flops_per_token(model.config, BLOCK_SIZE)
    assert metrics["train/device/flops_per_sec"] == pytest.approx(samples_per_sec * flops_per_sample)
    assert metrics["train/samples"] == 12 * 4
    assert not any(name.startswith("validate/") for name in metrics)


@pytest.mark.parametrize(
    "device_name, expected",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)],
)
def test_dense_bf16_peaks_for_mfu(device_name, expected):
    # Lightning's table lacks the H200 and lists Hopper's bf16 peak with 2:4 sparsity (twice the dense rate)
    assert dense_peak_flops(device_name, torch.bfloat16) == expected
    assert dense_peak_flops(device_name, torch.float32) is None  # the table covers 16-bit compute only


class WithFrozenTeacher(LanguageModelModule):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.teacher = PicoGPT(config).requires_grad_(False)


def test_weight_decay_goes_to_linear_and_embedding_weights_only():
    model = WithFrozenTeacher(tiny_config(), lr_decay_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups

    student = model.model
    expected_decay = {id(student.tok_embeddings.weight)}  # = lm_head.weight, tied
    for block in student.blocks:
        expected_decay |= {id(block.attn.qkv.weight), id(block.attn.proj.weight)}
        expected_decay |= {id(block.mlp.gate_proj.weight), id(block.mlp.up_proj.weight), id(block.mlp.down_proj.weight)}
    expected_no_decay = {id(student.norm.weight)}
    expected_no_decay |= {id(p) for block in student.blocks for p in (block.attn_norm.weight, block.mlp_norm.weight)}

    assert {id(p) for p in decay["params"]} == expected_decay and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == expected_no_decay and no_decay["weight_decay"] == 0.0
    assert optimizer.defaults["fused"] is True  # CPU has a fused AdamW kernel


@pytest.mark.parametrize(
    "precision, clip, fused",
    [("32-true", 1.0, True), ("bf16-true", 1.0, True), ("bf16-mixed", None, True), ("bf16-mixed", 1.0, True)],
)
def test_fused_adamw_with_and_without_clipping(precision, clip, fused):
    # no loss scaler in any of these, so the module clips before the fused step (fp16's scaler needs CUDA)
    model = LanguageModelModule(tiny_config(), lr_decay_steps=10)
    model.trainer = quiet_trainer(precision=precision, gradient_clip_val=clip)
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is fused
