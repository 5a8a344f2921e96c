"""PicoGPT <-> transformers' LlamaForCausalLM, weight for weight.

The configs map onto each other in hf_config.py.

The two models compute the same function: llama's decoder is exactly PicoGPT with
mlp="swiglu". The only layout difference is attention's fused projection: PicoGPT
keeps q, k and v in one matrix whose rows are [n_head * hs | groups * hs | groups * hs],
llama keeps three matrices. Everything else is a rename.
"""

import os
from typing import Dict, Optional

import torch

from picogpt_lightning.atomic import write_atomically
from picogpt_lightning.hf_config import BLOCK_RENAMES, llama_config, picogpt_config  # noqa: F401 (also imported from here)
from picogpt_lightning.model import PicoGPT, PicoGPTConfig


def to_hf(model: PicoGPT, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """A transformers.LlamaForCausalLM computing the same logits as `model` (in eval mode)."""
    from transformers import LlamaForCausalLM

    config = model.config
    llama = LlamaForCausalLM(llama_config(config, bos_token_id, eos_token_id, pad_token_id))
    llama.to(next(model.parameters()).dtype)
    missing, unexpected = llama.load_state_dict(llama_state_dict(model), strict=False)
    # a tied lm_head is the embedding itself: nothing separate to load
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_weights else set()):
        raise RuntimeError(f"weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    llama.generation_config.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return llama.eval()


def from_hf(llama) -> PicoGPT:
    """A PicoGPT computing the same logits as a transformers LlamaForCausalLM."""
    config = picogpt_config(llama.config)
    with torch.device("meta"):  # no random weights first: the copies below become the parameters
        model = PicoGPT(config)
    model.load_state_dict(picogpt_state_dict(llama.state_dict(), config), assign=True)
    if config.tie_weights:  # assigning replaced the shared parameter by two
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval()


def llama_state_dict(model: PicoGPT) -> Dict[str, torch.Tensor]:
    config = model.config
    source = model.state_dict()
    q_width = config.n_head * config.head_size
    kv_width = config.n_query_groups * config.head_size
    target = {
        "model.embed_tokens.weight": source["tok_embeddings.weight"],
        "model.norm.weight": source["norm.weight"],
    }
    if not config.tie_weights:
        target["lm_head.weight"] = source["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias"):
            fused = source.get(f"{ours}attn.qkv.{suffix}")
            if fused is None:
                continue
            q, k, v = fused.split((q_width, kv_width, kv_width), dim=0)
            target[f"{theirs}self_attn.q_proj.{suffix}"] = q
            target[f"{theirs}self_attn.k_proj.{suffix}"] = k
            target[f"{theirs}self_attn.v_proj.{suffix}"] = v
        for our_name, their_name in BLOCK_RENAMES.items():
            for suffix in ("weight", "bias"):
                if f"{ours}{our_name}.{suffix}" in source:
                    target[f"{theirs}{their_name}.{suffix}"] = source[f"{ours}{our_name}.{suffix}"]
    return {name: tensor.detach().clone() for name, tensor in target.items()}


def picogpt_state_dict(source: Dict[str, torch.Tensor], config: PicoGPTConfig) -> Dict[str, torch.Tensor]:
    target = {
        "tok_embeddings.weight": source["model.embed_tokens.weight"],
        "norm.weight": source["model.norm.weight"],
        # tied: the same tensor; untied: llama's own head
        "lm_head.weight": source.get("lm_head.weight", source["model.embed_tokens.weight"]),
    }
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias"):
            parts = [source.get(f"{theirs}self_attn.{name}_proj.{suffix}") for name in "qkv"]
            if all(part is not None for part in parts):
                target[f"{ours}attn.qkv.{suffix}"] = torch.cat(parts, dim=0)
        for our_name, their_name in BLOCK_RENAMES.items():
            for suffix in ("weight", "bias"):
                if f"{theirs}{their_name}.{suffix}" in source:
                    target[f"{ours}{our_name}.{suffix}"] = source[f"{theirs}{their_name}.{suffix}"]
    return {name: tensor.detach().clone() for name, tensor in target.items()}


def save_pretrained(model: PicoGPT, directory: str, tokenizer: Optional[object] = None) -> None:
    """Writes a directory that AutoModelForCausalLM and AutoTokenizer.from_pretrained load offline,
    with a model card (README.md) saying what the model is and which special tokens it uses."""
    ids = {}
    if tokenizer is not None:
        tokenizer = tokenizer.for_export()  # bos, eos and pad, as transformers and lm-eval expect
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    to_hf(model, **ids).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    card = model_card(model.config, tokenizer)
    write_atomically(os.path.join(directory, "README.md"), lambda file: file.write(card.encode()))


def model_card(config: PicoGPTConfig, tokenizer=None) -> str:
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
        "# A picogpt_lightning model", "",
        f"A llama-architecture decoder ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
        f"{config.n_query_groups} key/value groups, {config.vocab_size} tokens), trained on windows of "
        f"{config.block_size} tokens and saved as `LlamaForCausalLM`.", "",
        f"picogpt_lightning decodes past {config.block_size} tokens with a sliding window (each token sees the last "
        f"{config.block_size}), as `MistralForCausalLM` with `sliding_window={config.block_size}` does on these weights; "
        "`LlamaForCausalLM` attends to everything, so past that length the two differ.",
    ]
    if tokenizer is not None:
        names = {"bos": tokenizer.hf.bos_token, "eos": tokenizer.hf.eos_token, "pad": tokenizer.hf.pad_token}
        listed = ", ".join(f"{name} {token!r} (id {tokenizer.hf.convert_tokens_to_ids(token)})" for name, token in names.items())
        lines += ["", f"Tokenizer: {tokenizer.kind!r}. Special tokens: {listed}."]
        if tokenizer.kind == "char":
            lines.append(
                "A character vocabulary has no end-of-text symbol of its own, so the newline serves as bos, eos and pad: "
                "transformers' `generate` stops at the end of a line unless given `eos_token_id=None`, and batches "
                "pad on the left."
            )
    return "\n".join(lines) + "\n"
