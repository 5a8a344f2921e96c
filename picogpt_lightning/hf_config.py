"""PicoGPTConfig <-> transformers' LlamaConfig (and MistralConfig, read), field by field.

Written against transformers 5 (setup.cfg pins it): RoPE settings live in the config's
`rope_parameters`, where transformers 5 also files the `rope_theta` and `rope_scaling` of
older config.json files, so both are read (and unsupported scalings refused) in one place.
Nothing here builds a model, so a checkpoint reader can use it without the model's package.
"""

from picogpt_lightning.errors import UserError
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.rope import check_rope_scaling

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


ARCHITECTURES = ("llama", "mistral")  # config.json model_type values PicoGPT computes exactly


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
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": float(config.rope_theta)}
    return LlamaConfig(
        **fields,
        head_dim=config.head_size,
        hidden_act="silu",
        rope_parameters=rope,
        tie_word_embeddings=config.tie_weights,
        attention_bias=config.bias,
        mlp_bias=config.mlp_bias,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def picogpt_config(hf_config) -> PicoGPTConfig:
    """The PicoGPTConfig of a LlamaConfig or MistralConfig; anything PicoGPT does not compute is refused in one
    line naming the config.json field."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"config.json model_type {model_type!r} is not supported; PicoGPT loads {list(ARCHITECTURES)} "
            "(LlamaForCausalLM, MistralForCausalLM)"
        )
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if hf_config.hidden_act != "silu":
        raise UserError(f"config.json hidden_act={hf_config.hidden_act!r} is not supported; PicoGPT's SwiGLU uses silu")
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    fields = {pico: getattr(hf_config, llama) for pico, llama in SHARED_FIELDS}
    # Mistral's sliding window is PicoGPT's block_size: past it each token sees the last block_size
    window = getattr(hf_config, "sliding_window", None) if model_type == "mistral" else None
    if window:
        fields["block_size"] = min(int(window), fields["block_size"])
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    try:
        scaling = check_rope_scaling({key: value for key, value in rope.items() if key != "rope_theta"})
    except UserError as error:
        raise UserError(f"config.json rope_scaling: {error}") from None
    return PicoGPTConfig(
        **fields,
        mlp="swiglu",
        tie_weights=bool(hf_config.tie_word_embeddings),
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rope_scaling=scaling,
        head_dim=None if head_dim * hf_config.num_attention_heads == hf_config.hidden_size else head_dim,
        bias=attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
    )
