"""The compiled decode step: `next_token_logits` through torch.compile, one graph per shape.

Kept apart from decoding: the loops call whatever step they are given, eager or compiled.
"""

import functools

import torch
from transformers import GenerationConfig

from picogpt_lightning.generation.decode import next_token_logits
from picogpt_lightning.model.cache import StaticKVCache


def decode_step_for(config: GenerationConfig, device: torch.device):
    """`next_token_logits`, compiled when the static cache gives it fixed shapes and compiling is not disabled.

    By default with inductor, and on CUDA with mode="reduce-overhead" so that a step
    replays as one CUDA graph; a transformers `CompileConfig` in `compile_config` picks
    the backend, mode and options. fullgraph=True always: the step has no graph break.
    """
    if config.disable_compile or config.cache_implementation != "static":
        return next_token_logits
    compile_config = config.compile_config
    if compile_config is None:
        backend, mode, options = "inductor", ("reduce-overhead" if device.type == "cuda" else None), None
    else:
        backend, mode, options = compile_config.backend, compile_config.mode, compile_config.options
    return CompiledDecodeSteps(backend, mode, options)


class CompiledDecodeSteps:
    """One compiled `next_token_logits` per (batch, max_length), each with its own dynamo cache.

    dynamo keeps one list of compiled graphs per function and, with fullgraph=True, fails
    once that list holds recompile_limit (8) graphs; generating with many prompt lengths
    must not, so each shape gets its own region (torch.compile's isolate_recompiles).
    """

    def __init__(self, backend, mode, options):
        self.backend, self.mode, self.options = backend, mode, options
        self.cuda_graphs = mode == "reduce-overhead"

    def __call__(self, model, input_ids, cache_position, attention_mask, cache: StaticKVCache) -> torch.Tensor:
        options = tuple(sorted((self.options or {}).items()))  # hashable, for compiled_step's cache
        step = compiled_step(cache.batch_size, cache.max_length, self.backend, self.mode, options)
        if self.cuda_graphs:
            # a new step: the previous replay's outputs may be overwritten; keep this step's logits
            torch.compiler.cudagraph_mark_step_begin()
            return step(model, input_ids, cache_position, attention_mask, cache).clone()
        return step(model, input_ids, cache_position, attention_mask, cache)


@functools.lru_cache(maxsize=64)
def compiled_step(batch: int, max_length: int, backend, mode, options: tuple):
    return torch.compile(
        next_token_logits, fullgraph=True, dynamic=False, backend=backend, mode=mode,
        options=dict(options) or None, isolate_recompiles=True,
    )
