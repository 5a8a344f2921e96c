"""PicoGPT: token embedding -> pre-norm blocks -> final RMSNorm -> lm_head."""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from picogpt_lightning.model import generation
from picogpt_lightning.model.cache import StaticKVCache, static_attention_mask, static_position_ids
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.layers import Block, KVCache, RotaryEmbedding, build_attention_mask, make_dropout

@dataclass
class PicoGPTOutput:
    logits: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    past_key_values: Optional[Tuple[KVCache, ...]] = None


class PicoGPT(nn.Module):
    def __init__(self, config: PicoGPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed_dropout = make_dropout(config.dropout)
        self.rotary = RotaryEmbedding(config.head_size, config.rope_theta)
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
        past_key_values: Optional[Union[Tuple[KVCache, ...], StaticKVCache]] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        cache_position: Optional[torch.Tensor] = None,
    ) -> PicoGPTOutput:
        """`past_key_values`: the growing cache (a tuple per layer, returned extended when
        use_cache=True), or a `StaticKVCache` written in place at `cache_position` (T,) with
        an attention_mask of (B, cache.max_length) or none, as transformers' StaticCache is used."""
        B, T = input_ids.shape
        static = isinstance(past_key_values, StaticKVCache)
        if static:
            mask, default_positions = self._static_mask_and_positions(attention_mask, past_key_values, cache_position, B, T)
        else:
            mask, default_positions = self._growing_mask_and_positions(attention_mask, past_key_values, B, T, input_ids.device)
        if position_ids is None:
            position_ids = default_positions

        x = self.tok_embeddings(input_ids)
        if self.training and self.config.neftune_noise_alpha > 0:
            x = self._neftune(x, attention_mask)
        x = self.embed_dropout(x)

        cos, sin = self.rotary(position_ids, dtype=x.dtype)
        hidden_states: List[torch.Tensor] = [x] if output_hidden_states else []
        presents = []
        for i, block in enumerate(self.blocks):
            past = past_key_values[i] if past_key_values else None
            x, present = block(x, cos, sin, mask, past, use_cache, cache_position)
            presents.append(present)
            if output_hidden_states and i < len(self.blocks) - 1:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            # as transformers: the last entry is the final block's output after the final norm
            hidden_states.append(x)
        if static:
            cache = past_key_values  # written in place
        else:
            cache = tuple(presents) if use_cache else None
        return PicoGPTOutput(
            logits=self.lm_head(x),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            past_key_values=cache,
        )

    def _growing_mask_and_positions(self, attention_mask, past_key_values, B, T, device):
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_len + T > self.config.block_size:
            raise ValueError(
                f"sequence length {past_len + T} exceeds block_size {self.config.block_size}; "
                "shorten the input or train with a larger block_size"
            )
        if attention_mask is not None and attention_mask.shape != (B, past_len + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past_len + T)} "
                "(batch, cached + new tokens)"
            )
        mask = build_attention_mask(attention_mask, T, past_len, device)
        return mask, positions_from_mask(attention_mask, B, T, past_len, device)

    def _static_mask_and_positions(self, attention_mask, cache: StaticKVCache, cache_position, B, T):
        # shapes only, no tensor values read on the host: a decode step compiles to one graph
        if cache_position is None or cache_position.shape != (T,):
            raise ValueError(f"a StaticKVCache needs cache_position, a tensor of the {T} positions the new tokens take")
        if cache.batch_size != B:
            raise ValueError(f"the StaticKVCache holds {cache.batch_size} rows but input_ids has {B}")
        if attention_mask is not None and attention_mask.shape != (B, cache.max_length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, cache.max_length)} "
                "(batch, the static cache's max_length)"
            )
        mask = static_attention_mask(attention_mask, cache_position, cache.max_length)
        return mask, static_position_ids(attention_mask, cache_position, B)

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
        `picogpt_lightning.model.generation` for the rules.
        """
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
        """Rebuilds a model from a Lightning .ckpt of any module here, or from `PicoGPT.save`.

        `path` may also be a `checkpoints.Checkpoint` already read. A bare state dict needs
        `config`; with a stored config, `config` must describe the same architecture
        (training-only fields such as dropout may differ).
        """
        from picogpt_lightning import checkpoints

        checkpoint = checkpoints.load(path)
        model = cls(checkpoint.resolve_config(config))
        checkpoint.load_weights(model, strict=strict)
        return model


def positions_from_mask(
    attention_mask: Optional[torch.Tensor], batch: int, length: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Position of each new token: its count of real tokens before it, so padding shifts nothing."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + length, device=device).expand(batch, length)
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)[:, past_len:]
