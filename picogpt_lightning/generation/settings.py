"""Generation settings: one transformers `GenerationConfig`, this project's defaults, checked inputs."""

import copy
from typing import List, Optional, Tuple

import torch
from transformers import GenerationConfig

from picogpt_lightning.errors import UserError, first_line

# what an unset GenerationConfig field means here (transformers' own top_k default is 50; here None is no top-k)
DEFAULTS = dict(
    max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
    num_beams=1, num_return_sequences=1, length_penalty=1.0, early_stopping=False, use_cache=True,
    disable_compile=False,
)
# below this a temperature or repetition penalty divides logits past float32's range (1e-300 is 0 in float32)
MIN_DIVISOR = 1e-30
# a top_p below float32's resolution is 0 to the nucleus's cumulative sum of probabilities
MIN_TOP_P = float(torch.finfo(torch.float32).eps)
# cache_implementation: None (or "dynamic") is the growing cache, "static" the preallocated one
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")

SEED_RANGE = (-(2**63), 2**64 - 1)  # the seeds torch.manual_seed takes


def resolve_generation_config(generation_config: Optional[GenerationConfig] = None, **kwargs) -> GenerationConfig:
    """A copy of `generation_config` (or a fresh one) updated by `kwargs`, unset fields filled from DEFAULTS."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise UserError(
            f"generation_config must be a transformers.GenerationConfig, got {type(generation_config).__name__}"
        )
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unknown = sorted(name for name in kwargs if not hasattr(config, name))
    if unknown:
        raise UserError(f"unknown generation option(s) {unknown}; see transformers.GenerationConfig for the names")
    for name, value in kwargs.items():
        setattr(config, name, value)
    for name, value in DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    return config


def normalize_eos(eos_token_id) -> List[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(token) for token in eos_token_id]


def validate_inputs(model_config, config: GenerationConfig, input_ids, attention_mask, streamer) -> None:
    """One-line ValueErrors naming the argument; sampling arguments are checked only when sampling.

    What depends on the model or on this implementation is checked here; transformers' own
    `GenerationConfig.validate` runs last for the rest (max_new_tokens > 0, early_stopping,
    num_return_sequences <= num_beams, ...).
    """
    validate_prompt(model_config, input_ids, attention_mask, config.max_new_tokens)
    validate_options(model_config, config)
    if streamer is not None and config.num_beams > 1:
        raise UserError("a streamer shows one token per step and cannot follow beam search; use num_beams=1")
    try:
        config.validate()
    except ValueError as error:
        raise UserError(first_line(error)) from None


def validate_prompt(model_config, input_ids, attention_mask, max_new_tokens) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise UserError("input_ids must be a 2-D integer tensor (batch, prompt length)")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise UserError(f"input_ids must hold at least one token per prompt, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise UserError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    if not isinstance(max_new_tokens, int):  # its sign is GenerationConfig.validate's to check
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    # past the model's block_size attention slides over the last block_size tokens (model/cache.py)


def validate_options(model_config, config: GenerationConfig) -> None:
    if config.do_sample:
        if not config.temperature > 0:
            raise UserError(
                f"temperature must be > 0 when sampling, got {config.temperature!r} (use do_sample=False for greedy)"
            )
        if not MIN_DIVISOR <= config.temperature < float("inf"):
            raise UserError(
                f"temperature {config.temperature!r} is outside what float32 logits can be divided by "
                f"[{MIN_DIVISOR:g}, inf); use do_sample=False for greedy (the limit of a temperature near 0)"
            )
        if config.top_k is not None and (not isinstance(config.top_k, int) or config.top_k < 0):
            raise UserError(f"top_k must be a non-negative integer (0 or None: no top-k), got {config.top_k!r}")
        if config.top_p is not None and not 0.0 <= config.top_p <= 1.0:
            raise UserError(f"top_p must be in [0, 1], got {config.top_p!r}")
        if config.top_p is not None and 0.0 < config.top_p < MIN_TOP_P:
            raise UserError(
                f"top_p {config.top_p!r} is below float32's resolution ({MIN_TOP_P:.1e}); use top_p >= {MIN_TOP_P:.1e}, "
                "or top_k=1 for the most likely token"
            )
    if not config.repetition_penalty > 0:
        raise UserError(f"repetition_penalty must be > 0 (1.0: no penalty), got {config.repetition_penalty!r}")
    if not MIN_DIVISOR <= config.repetition_penalty <= 1 / MIN_DIVISOR:
        raise UserError(f"repetition_penalty {config.repetition_penalty!r} is outside what float32 logits can be "
                        f"scaled by [{MIN_DIVISOR:g}, {1 / MIN_DIVISOR:g}]; 1.0 is no penalty")
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if config.num_beams == 1 and not config.do_sample and config.num_return_sequences > 1:
        # transformers refuses this too, but its message names no way out
        raise UserError("greedy decoding returns one sequence per prompt; use do_sample=True or num_beams > 1")
    pad = [] if config.pad_token_id is None else [config.pad_token_id]
    for name, tokens in (("eos_token_id", normalize_eos(config.eos_token_id)), ("pad_token_id", pad)):
        for token in tokens:
            if not 0 <= token < model_config.vocab_size:
                raise UserError(f"{name} {token} is outside the vocabulary [0, {model_config.vocab_size})")
    if config.cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise UserError(
            f"cache_implementation must be None or 'dynamic' (the growing cache) or 'static', "
            f"got {config.cache_implementation!r}"
        )
    if config.cache_implementation == "static" and not config.use_cache:
        raise UserError("cache_implementation='static' is a KV cache: it needs use_cache=True")


def prepare_inputs(
    config: GenerationConfig, input_ids, attention_mask
) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[int], Optional[int]]:
    """input_ids as longs, the padding mask (None: no padding), the eos ids and the id finished rows continue with."""
    eos = normalize_eos(config.eos_token_id)
    pad_token_id = config.pad_token_id
    if pad_token_id is None and eos:
        pad_token_id = eos[0]  # finished sequences are filled with eos, as transformers does
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = padding_mask_from_pad_token(input_ids, pad_token_id, eos)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the model's unmasked path is faster and identical
    return input_ids, attention_mask, eos, pad_token_id


def padding_mask_from_pad_token(input_ids, pad_token_id, eos) -> Optional[torch.Tensor]:
    """transformers' inference: pad tokens in the prompt are padding, unless pad is also an eos token."""
    if pad_token_id is None or pad_token_id in eos or not bool((input_ids == pad_token_id).any()):
        return None
    return (input_ids != pad_token_id).long()
