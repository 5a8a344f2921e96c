"""What a step costs in matmul FLOPs, and what Lightning's ThroughputMonitor counts in a batch."""

from typing import Dict

import torch

from picogpt_lightning.model.config import PicoGPTConfig


def flops_per_token(config: PicoGPTConfig, seq_len: int, training: bool = True) -> int:
    """Matmul FLOPs one token costs in a sequence of seq_len tokens (PaLM's appendix B, nanoGPT's MFU).

    Forward: 2 FLOPs per weight of every matmul (attention projections, MLP, lm_head; the
    embedding lookup is no matmul, a tied lm_head is) plus 4 * n_layer * n_embd * seq_len for
    QK^T and attention-times-V. Backward costs twice the forward, so training is 3x.
    """
    head_dims = config.n_head * config.head_size
    attention = config.n_embd * (config.n_head + 2 * config.n_query_groups) * config.head_size
    attention += head_dims * config.n_embd
    mlp = (3 if config.mlp == "swiglu" else 2) * config.n_embd * config.intermediate_size
    matmul_weights = config.n_layer * (attention + mlp) + config.n_embd * config.vocab_size
    forward = 2 * matmul_weights + 4 * config.n_layer * head_dims * seq_len
    return 3 * forward if training else forward


# what Lightning's ThroughputMonitor counts: batch_size_fn and length_fn (configs name them by import path)
def sequences_in_batch(batch: Dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def positions_in_batch(batch: Dict[str, torch.Tensor]) -> int:
    """Token positions computed, pads included: counting real tokens would sync the GPU every step."""
    return batch["input_ids"].numel()
