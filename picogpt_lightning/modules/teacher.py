"""The frozen teacher of a distillation: a PicoGPT (a checkpoint of this project or a Llama-family folder),
or any transformers causal LM, optionally in 4 bits; its size and forward cost."""

import importlib.util
import json
import os
from typing import Optional, Tuple

import torch
from torch import nn

from picogpt_lightning import checkpoints
from picogpt_lightning.errors import UserError, first_line
from picogpt_lightning.hf_config import ARCHITECTURES
from picogpt_lightning.hf_folder import CONFIG_FILE, is_model_folder
from picogpt_lightning.model import PicoGPT
from picogpt_lightning.modules.flops import flops_per_token

QUANTIZATIONS = ("4bit",)


def load_teacher(source, quantization: Optional[str] = None) -> nn.Module:
    """A PicoGPT from a checkpoint of this project (a path or one read) or a Llama-family folder, else a
    transformers causal LM."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UserError(f"teacher_quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    # a 4-bit teacher is transformers' (bitsandbytes); otherwise PicoGPT computes what it can load
    if isinstance(source, checkpoints.Checkpoint) or (quantization is None and is_picogpt_checkpoint(source)):
        if quantization is not None:
            raise UserError("teacher_quantization applies to transformers teachers; a PicoGPT checkpoint loads as is")
        return PicoGPT.from_checkpoint(source)
    from transformers import AutoModelForCausalLM

    options = {"quantization_config": four_bit_config()} if quantization == "4bit" else {}
    try:
        return AutoModelForCausalLM.from_pretrained(source, **options)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for "not a model"
        raise UserError(
            f"cannot load teacher {source!r} ({first_line(error)}); pass a .ckpt of this project, a transformers model "
            "directory, or a hub id while online"
        ) from None


def is_picogpt_checkpoint(source: str) -> bool:
    """A checkpoint file of this project, or a Llama-family folder PicoGPT computes; other folders and hub
    ids load through transformers."""
    if is_model_folder(source):
        with open(os.path.join(source, CONFIG_FILE)) as file:
            return json.load(file).get("model_type") in ARCHITECTURES
    return source.endswith((".ckpt", ".pt")) or os.path.isfile(source)


def four_bit_config():
    """NF4 weights with bfloat16 compute (QLoRA's recipe); needs bitsandbytes and a CUDA GPU."""
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        missing = "bitsandbytes" if importlib.util.find_spec("bitsandbytes") is None else "a CUDA GPU"
        raise UserError(
            f"teacher_quantization='4bit' needs bitsandbytes and a CUDA GPU, and {missing} is missing; "
            "pip install bitsandbytes on a GPU machine, or drop teacher_quantization"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def teacher_forward_flops(teacher: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per token: as the base counts them for a PicoGPT; for a transformers model,
    2 per weight of its blocks and its lm_head matmul (attention scores left out)."""
    if isinstance(teacher, PicoGPT):
        return flops_per_token(teacher.config, seq_len, training=False)
    vocab_size, _, width = teacher_layout(teacher)
    return 2 * (teacher.num_parameters(exclude_embeddings=True) + vocab_size * width)


def teacher_layout(teacher: nn.Module) -> Tuple[int, int, int]:
    """(vocabulary size, number of blocks, hidden width) of a PicoGPT or transformers teacher."""
    config = teacher.config
    if isinstance(teacher, PicoGPT):
        return config.vocab_size, config.n_layer, config.n_embd
    # transformers configs name these alike across architectures (GPT-2 maps n_layer/n_embd onto them)
    return config.vocab_size, config.num_hidden_layers, config.hidden_size
