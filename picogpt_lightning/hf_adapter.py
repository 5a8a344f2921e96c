"""A LoRA run as Hugging Face files: the base as LlamaForCausalLM, the adapter in peft's own format.

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR + "/adapter")

computes what the run's model computes. Llama keeps q, k and v in three matrices where PicoGPT
fuses them; an adapter on the fused projection, delta = s * B A with B's rows
[q | k | v], is exactly three adapters that share A: delta_q = s * B_q A, and so on.
"""

import os
from typing import Dict

import torch

from picogpt_lightning.hf import BLOCK_RENAMES, save_pretrained
from picogpt_lightning.lora import ADAPTER_MARK, LoraSettings, effective_base, peft_config
from picogpt_lightning.model import PicoGPT, PicoGPTConfig

ADAPTER_DIRECTORY = "adapter"
PEFT_PREFIX = "base_model.model."  # PeftModel's wrapper around the transformers model
QKV = ("q_proj", "k_proj", "v_proj")


def llama_targets(settings: LoraSettings) -> list:
    """PicoGPT's target projections under Llama's names."""
    names = []
    for name in settings.target_modules:
        names += list(QKV) if name == "qkv" else [BLOCK_RENAMES.get(f"attn.{name}", f"mlp.{name}").split(".")[-1]]
    return names


def peft_adapter_state(adapters: Dict[str, torch.Tensor], config: PicoGPTConfig) -> Dict[str, torch.Tensor]:
    """The project's adapter tensors under the names peft saves for a LlamaForCausalLM."""
    widths = (config.n_head * config.head_size, *(2 * [config.n_query_groups * config.head_size]))
    target = {}
    for key, tensor in adapters.items():
        layer, rest = key.split(ADAPTER_MARK)
        matrix = rest.split(".")[0]  # "A" or "B"
        _, index, ours = layer.split(".", 2)  # "blocks", "3", "attn.qkv"
        prefix = f"{PEFT_PREFIX}model.layers.{index}."
        if ours == "attn.qkv":
            parts = tensor.split(widths, dim=0) if matrix == "B" else [tensor] * 3
            for name, part in zip(QKV, parts):
                target[f"{prefix}self_attn.{name}.lora_{matrix}.weight"] = part
        else:
            target[f"{prefix}{BLOCK_RENAMES[ours]}.lora_{matrix}.weight"] = tensor
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in target.items()}


def save_lora_export(
    directory: str, base_state: Dict[str, torch.Tensor], adapters: Dict[str, torch.Tensor],
    config: PicoGPTConfig, settings: LoraSettings, tokenizer=None,
) -> None:
    """Writes the base (NF4-rounded for QLoRA: what the adapters saw) to `directory` and the adapter to
    `directory`/adapter. The caller makes the directory atomic (commands/export.py)."""
    from safetensors.torch import save_file

    base = PicoGPT(config)
    base.load_state_dict(effective_base(base_state, settings))
    save_pretrained(base.eval(), directory, tokenizer)
    adapter_directory = os.path.join(directory, ADAPTER_DIRECTORY)
    peft_config(settings, llama_targets(settings), task_type="CAUSAL_LM").save_pretrained(adapter_directory)
    state = peft_adapter_state(adapters, config)
    save_file(state, os.path.join(adapter_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
