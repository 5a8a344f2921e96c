"""PicoGPT: token embedding -> pre-norm blocks -> final RMSNorm -> lm_head."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.model.attention import CausalSelfAttention, RotaryEmbedding
from picogpt_lightning.model.cache import KeysValues, KVCache, appended_positions, as_cache
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.layers import GeluMLP, SwiGLU, make_dropout
from picogpt_lightning.model.masks import attention_mask_for, position_ids_for


@dataclass
class PicoGPTOutput:
    logits: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    past_key_values: Optional[KVCache] = None  # iterates as (keys, values) per layer, like legacy tuples
    qkv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # one block's, with output_qkv_layer


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)

    def forward(self, x, cos, sin, mask, cache=None, cache_position=None, output_qkv=False):
        """The block's output; with output_qkv, also its attention's (queries, keys, values)."""
        attended = self.attn(self.attn_norm(x), cos, sin, mask, cache, cache_position, output_qkv)
        x = x + attended[0]
        x = x + self.mlp(self.mlp_norm(x))
        return (x, attended[2]) if output_qkv else x


class PicoGPT(nn.Module):
    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed_dropout = make_dropout(config.dropout)
        self.rotary = RotaryEmbedding(config.head_size, config.rope_theta, config.rope_scaling)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_weights:
            self.lm_head.weight = self.tok_embeddings.weight

    def _init_weights(self, module: nn.Module) -> None:
        # nanoGPT / GPT-2: N(0, 0.02), and residual projections scaled down by sqrt(2 * n_layer)
        # so the residual stream's variance does not grow with depth
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[Union[KVCache, Sequence[KeysValues]]] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        cache_position: Optional[torch.Tensor] = None,
        output_qkv_layer: Optional[int] = None,
        logits_to_keep: int = 0,
    ) -> PicoGPTOutput:
        """`past_key_values`: a cache of `picogpt_lightning.model.cache`, or transformers' legacy
        tuple of (keys, values) per layer. With use_cache=True and none given, a growing
        `DynamicCache` is made and returned; a given cache is extended in place and returned.
        A `StaticKVCache` is written at `cache_position` (T,) with an attention_mask of
        (B, cache.max_length) or none, as transformers' StaticCache is used. Inputs longer than
        block_size attend through a sliding window of block_size tokens (see model/cache.py).
        `output_qkv_layer`: a block index (negative counts from the end) whose attention's
        queries, keys and values come back in `qkv` (attention-relation distillation).
        `logits_to_keep` (transformers' name): N > 0 projects only the last N positions to the
        vocabulary, so `logits` is (B, N, vocab); 0 keeps them all. Hidden states are whole."""
        qkv_layer = self._qkv_layer(output_qkv_layer)
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise UserError(f"logits_to_keep must be an int >= 0 (0 keeps every position), got {logits_to_keep!r}")
        cache = as_cache(past_key_values, use_cache, self.config)
        mask, default_positions, cache_position = self._mask_and_positions(
            input_ids, attention_mask, cache, cache_position
        )
        if position_ids is None:
            position_ids = default_positions

        x = self.tok_embeddings(input_ids)
        if self.training and self.config.neftune_noise_alpha > 0:
            x = self._neftune(x, attention_mask)
        x = self.embed_dropout(x)

        cos, sin = self.rotary(position_ids, dtype=x.dtype)
        hidden_states: List[torch.Tensor] = [x] if output_hidden_states else []
        qkv = None
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if i == qkv_layer:
                x, qkv = block(x, cos, sin, mask, layer_cache, cache_position, output_qkv=True)
            else:
                x = block(x, cos, sin, mask, layer_cache, cache_position)
            if output_hidden_states and i < len(self.blocks) - 1:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            # as transformers: the last entry is the final block's output after the final norm
            hidden_states.append(x)
        return PicoGPTOutput(
            logits=self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            # a cache the caller passed is returned as it was written in place, whatever use_cache says
            past_key_values=cache if use_cache or isinstance(past_key_values, KVCache) else None,
            qkv=qkv,
        )

    def _qkv_layer(self, layer: Optional[int]) -> Optional[int]:
        """The block index output_qkv_layer names, counted from 0 (None: no block's)."""
        if layer is None:
            return None
        n = self.config.n_layer
        if not isinstance(layer, int) or not -n <= layer < n:
            raise UserError(f"output_qkv_layer must be a block index in [-{n}, {n - 1}], got {layer!r}")
        return layer % n

    def _mask_and_positions(self, input_ids, attention_mask, cache: Optional[KVCache], cache_position):
        """The attention mask, default rotary positions and cache positions of the new tokens."""
        (B, T), device = input_ids.shape, input_ids.device
        if cache is None:
            cache_position, key_positions = appended_positions(0, 0, B, T, attention_mask, device)
        else:
            cache_position, key_positions = cache.prepare(B, T, attention_mask, cache_position, device)
        # past block_size attention slides, as Mistral's sliding_window: a query sees block_size keys at most
        contiguous = cache is None or cache.contiguous
        mask = attention_mask_for(attention_mask, cache_position, key_positions, self.config.block_size, contiguous)
        return mask, position_ids_for(attention_mask, cache_position, B), cache_position

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        generation_config=None,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor:
        """Greedy, sampling or beam-search decoding with transformers' arguments and semantics.

        `generation_config` is a `transformers.GenerationConfig`; keyword arguments
        (max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None, top_p=None,
        repetition_penalty=1.0, num_beams=1, num_return_sequences=1, length_penalty=1.0,
        early_stopping=False, eos_token_id=None, pad_token_id=None, use_cache=True,
        cache_implementation=None (growing cache) or "static", disable_compile=False) update a
        copy of it. Returns (batch * num_return_sequences, prompt + generated) token ids; see
        `picogpt_lightning.generation` for the rules.
        """
        from picogpt_lightning import generation

        return generation.generate(self, input_ids, attention_mask, generation_config, streamer, **kwargs)

    def _neftune(self, embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """NEFTune: uniform noise in [-a, a], a = alpha / sqrt(L * d), L = real tokens of each sequence."""
        B, T, d = embeddings.shape
        if attention_mask is None:
            lengths = torch.full((B,), T, device=embeddings.device, dtype=embeddings.dtype)
            keep = torch.ones(B, T, 1, device=embeddings.device, dtype=embeddings.dtype)
        else:
            keep = attention_mask[:, -T:, None].to(embeddings.dtype)
            lengths = attention_mask.sum(dim=1).to(embeddings.dtype).clamp(min=1)
        bound = self.config.neftune_noise_alpha / torch.sqrt(lengths * d)
        noise = torch.empty_like(embeddings).uniform_(-1.0, 1.0) * bound[:, None, None]
        return embeddings + noise * keep  # pads stay clean: they are not part of the sequence

    # ---- saving and loading: the file formats live in picogpt_lightning/checkpoints.py --------

    def save(self, path: str) -> None:
        """Writes config and weights in one file that `from_checkpoint` reads (atomically)."""
        from picogpt_lightning import checkpoints

        checkpoints.save(path, self)

    @classmethod
    def from_checkpoint(cls, path, config: Optional[PicoGPTConfig] = None, strict: bool = True) -> "PicoGPT":
        """Rebuilds a model from a Lightning .ckpt of any module here, from `PicoGPT.save`, or from a
        Hugging Face Llama-family model folder (in its own dtype).

        `path` may also be a `checkpoints.Checkpoint` already read. A bare state dict needs
        `config`; with a stored config, `config` must describe the same architecture
        (training-only fields such as dropout may differ).
        """
        from picogpt_lightning import checkpoints

        checkpoint = checkpoints.load(path)
        config = checkpoint.resolve_config(config)
        if checkpoint.quantization is not None or config.linear != "linear" or not strict:
            model = cls(config)  # packed or BitNet layers build buffers of their own first
            checkpoint.load_weights(model, strict=strict)
            return model
        # no random weights first: the parameters are the loaded tensors themselves, in their dtype
        with torch.device("meta"):
            model = cls(config)
        checkpoint.load_weights(model, assign=True)
        if config.tie_weights:  # assigning replaced the shared parameter by two
            model.lm_head.weight = model.tok_embeddings.weight
        return model
