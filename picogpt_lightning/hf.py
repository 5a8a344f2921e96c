"""PicoGPT <-> transformers' LlamaForCausalLM, weight for weight.

Written against transformers 5 (setup.cfg pins it): RoPE settings live in the config's
`rope_parameters`, where transformers 5 also files the `rope_theta` and `rope_scaling` of
older config.json files, so both are read (and unsupported scalings refused) in one place.

The two models compute the same function: llama's decoder is exactly PicoGPT with
mlp="swiglu". The only layout difference is attention's fused projection: PicoGPT
keeps q, k and v in one matrix whose rows are [n_head * hs | groups * hs | groups * hs],
llama keeps three matrices. Everything else is a rename.
"""

import os
from typing import Dict, Optional

import torch

from picogpt_lightning import checkpoints
from picogpt_lightning.errors import UserError
from picogpt_lightning.model import PicoGPT, PicoGPTConfig

# PicoGPT name in a block -> llama name in a decoder layer (same shapes)
BLOCK_RENAMES = {
    "attn.proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}


# the fields both configs hold under their own names: PicoGPTConfig's, then LlamaConfig's
SHARED_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("block_size", "max_position_embeddings"),
    ("n_layer", "num_hidden_layers"),
    ("n_embd", "hidden_size"),
    ("n_head", "num_attention_heads"),
    ("n_query_groups", "num_key_value_heads"),
    ("intermediate_size", "intermediate_size"),
    ("norm_eps", "rms_norm_eps"),
)


def llama_config(config: PicoGPTConfig, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """The LlamaConfig of the same architecture; refuses what llama cannot express."""
    from transformers import LlamaConfig

    if config.mlp != "swiglu":
        raise UserError(
            f"mlp={config.mlp!r} has no Llama equivalent (llama's MLP is SwiGLU); "
            "only models trained with mlp='swiglu' can be exported"
        )
    if config.linear != "linear":
        raise UserError(f"linear={config.linear!r} has no Llama equivalent; export a model with linear='linear'")
    if config.sub_norm:
        raise UserError("sub_norm=True (SubLN) has no Llama equivalent; export a model trained with sub_norm=False")
    fields = {llama: getattr(config, pico) for pico, llama in SHARED_FIELDS}
    return LlamaConfig(
        **fields,
        head_dim=config.head_size,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        tie_word_embeddings=config.tie_weights,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def picogpt_config(llama_config) -> PicoGPTConfig:
    """The PicoGPTConfig of a LlamaConfig; refuses llama variants PicoGPT does not implement."""
    rope = getattr(llama_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope_type={rope.get('rope_type')!r} is not supported; PicoGPT implements plain RoPE only")
    if llama_config.hidden_act != "silu":
        raise UserError(f"hidden_act={llama_config.hidden_act!r} is not supported; PicoGPT's SwiGLU uses silu")
    head_dim = getattr(llama_config, "head_dim", None) or llama_config.hidden_size // llama_config.num_attention_heads
    if head_dim * llama_config.num_attention_heads != llama_config.hidden_size:
        raise UserError("head_dim * num_attention_heads must equal hidden_size for PicoGPT")
    if llama_config.attention_bias != llama_config.mlp_bias:
        raise UserError("attention_bias and mlp_bias must agree: PicoGPT has one bias switch")
    fields = {pico: getattr(llama_config, llama) for pico, llama in SHARED_FIELDS}
    return PicoGPTConfig(
        **fields,
        mlp="swiglu",
        tie_weights=bool(llama_config.tie_word_embeddings),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        bias=bool(llama_config.attention_bias),
    )


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
    model = PicoGPT(config).to(llama.dtype)
    model.load_state_dict(picogpt_state_dict(llama.state_dict(), config))
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
    checkpoints.write_atomically(os.path.join(directory, "README.md"), lambda file: file.write(card.encode()))


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
