"""PicoGPT: token embedding -> pre-norm blocks -> final RMSNorm -> lm_head."""

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from picogpt_lightning.model import generation
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.model.layers import Block, KVCache, RotaryEmbedding, build_attention_mask, make_dropout

# keys a checkpoint of this project stores beside the weights (see modules/base.py)
CONFIG_KEY = "picogpt_config"
COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps modules under this attribute name


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
        past_key_values: Optional[Tuple[KVCache, ...]] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> PicoGPTOutput:
        B, T = input_ids.shape
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
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, B, T, past_len, input_ids.device)

        x = self.tok_embeddings(input_ids)
        if self.training and self.config.neftune_noise_alpha > 0:
            x = self._neftune(x, attention_mask)
        x = self.embed_dropout(x)

        cos, sin = self.rotary(position_ids, dtype=x.dtype)
        mask = build_attention_mask(attention_mask, T, past_len, input_ids.device)
        hidden_states: List[torch.Tensor] = [x] if output_hidden_states else []
        presents = []
        for i, block in enumerate(self.blocks):
            past = past_key_values[i] if past_key_values else None
            x, present = block(x, cos, sin, mask, past, use_cache)
            presents.append(present)
            if output_hidden_states and i < len(self.blocks) - 1:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            # as transformers: the last entry is the final block's output after the final norm
            hidden_states.append(x)
        return PicoGPTOutput(
            logits=self.lm_head(x),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            past_key_values=tuple(presents) if use_cache else None,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        early_stopping: Union[bool, str] = False,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        pad_token_id: Optional[int] = None,
        use_cache: bool = True,
        streamer=None,
    ) -> torch.LongTensor:
        """Greedy, sampling or beam-search decoding with transformers' arguments and semantics.

        Returns (batch * num_return_sequences, prompt + generated) token ids; see
        `picogpt_lightning.model.generation` for the rules.
        """
        return generation.generate(
            self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=length_penalty,
            early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            use_cache=use_cache, streamer=streamer,
        )

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

    # ---- saving and loading ----------------------------------------------------------

    def save(self, path: str) -> None:
        """Writes config and weights in one file that `from_checkpoint` reads (atomically)."""
        payload = {CONFIG_KEY: self.config.to_dict(), "state_dict": self.state_dict()}
        tmp = f"{path}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def from_checkpoint(cls, path: str, config: Optional[PicoGPTConfig] = None, strict: bool = True) -> "PicoGPT":
        """Rebuilds a model from a Lightning .ckpt of any module here, or from `PicoGPT.save`.

        A bare state dict needs `config`. Weights of a teacher or reference model stored in
        the same checkpoint are left out: only the trained model (attribute `model`) is read.
        """
        checkpoint = load_checkpoint_file(path)
        if config is None:
            stored = checkpoint.get(CONFIG_KEY) if isinstance(checkpoint, dict) else None
            if stored is None:
                raise ValueError(
                    f"{path} holds no model config ('{CONFIG_KEY}'); pass config=PicoGPTConfig(...) "
                    "or load a checkpoint written by this project"
                )
            config = PicoGPTConfig.from_dict(stored)
        model = cls(config)
        state_dict = extract_model_state_dict(checkpoint)
        try:
            model.load_state_dict(state_dict, strict=strict)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise ValueError(f"{path} does not match the model config: {first_line}") from None
        return model


def positions_from_mask(
    attention_mask: Optional[torch.Tensor], batch: int, length: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Position of each new token: its count of real tokens before it, so padding shifts nothing."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + length, device=device).expand(batch, length)
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)[:, past_len:]


def load_checkpoint_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}; check the path (runs write them under checkpoints/)")
    try:
        # full unpickling: Lightning checkpoints carry hyperparameters and loop state
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(error).__name__}); it may be truncated or corrupted"
        ) from None


def extract_model_state_dict(checkpoint: dict) -> dict:
    """The trained model's weights, without Lightning's `model.` or torch.compile's `_orig_mod.` prefixes."""
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError("checkpoint holds no state dict")
    is_lightning = any(key.startswith("model.") for key in state_dict)
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        if is_lightning:
            if not key.startswith("model."):
                continue  # a teacher, a reference model, a projection: not part of the model
            key = key[len("model.") :]
        cleaned[key.replace(COMPILE_PREFIX, "")] = value
    return cleaned
