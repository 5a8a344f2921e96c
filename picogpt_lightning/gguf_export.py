"""PicoGPT -> a GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs, through the `gguf` package.

The model is written as llama.cpp's `llama` architecture, as its convert_hf_to_gguf.py writes a
LlamaForCausalLM: the same tensors under GGUF's names, with q and k rows permuted from the
rotate-half layout (transformers', and PicoGPT's) to the adjacent pairs llama.cpp rotates.
The tokenizer goes beside the tensors in a form llama.cpp tokenizes back to the same ids:

- byte-level BPE ("bpe"): llama.cpp's `gpt2` model, GPT-2's pre-tokenizer, the merges in rank order;
- a character vocabulary ("char"): llama.cpp's SentencePiece model with one piece per character,
  no merges to make and no space prefix, a space written as "▁" as SentencePiece escapes it.

Packed checkpoints are written dequantized (int8 to q8_0 loses nothing more than q8_0 itself).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from picogpt_lightning.atomic import write_atomically
from picogpt_lightning.errors import UserError
from picogpt_lightning.hf import llama_config, llama_state_dict
from picogpt_lightning.model import PicoGPT
from picogpt_lightning.tokenizer import Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
SPM_SPACE = "\u2581"  # "▁": SentencePiece's escaped space
QUANT_BLOCK = 32  # q8_0 and q4_0 quantize rows in blocks of 32 values
# transformers' name in a decoder layer -> GGUF's in blk.N
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_gguf(model: PicoGPT, tokenizer: Tokenizer, path: str, gguf_type: str = "f16") -> None:
    """`model` (dequantized first if packed) and `tokenizer` as one GGUF file at `path`, written atomically."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    model = dequantized(model)
    config = model.config
    llama_config(config)  # refuses what llama cannot express (GELU MLPs, BitNet layers, SubLN)
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name("picogpt_lightning model")
    writer.add_description(
        f"picogpt_lightning slides a {config.block_size}-token window past block_size; llama.cpp attends to its "
        f"whole context, so the two agree within {config.block_size} tokens"
    )
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_key_length(config.head_size)
    writer.add_value_length(config.head_size)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, tensor in gguf_tensors(model).items():
        data, raw_type = encode_tensor(tensor, gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw_type)

    def write(file) -> None:
        writer.fout, writer.state = [file], gguf.gguf_writer.WriterState.EMPTY  # our atomic file, not a path it opens
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout = None  # write_atomically flushes, fsyncs and closes it

    write_atomically(path, write)


def dequantized(model: PicoGPT) -> PicoGPT:
    """The model with every packed layer (NF4, int8, int4) back as an nn.Linear of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "dequantize") and not isinstance(module, nn.Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.dequantize(torch.float32), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def gguf_tensors(model: PicoGPT) -> dict:
    """GGUF's tensor names -> float32 numpy arrays; q and k rows permuted to llama.cpp's rotary layout."""
    config = model.config
    tensors = {}
    for name, tensor in llama_state_dict(model).items():
        stem, _, suffix = name.rpartition(".")
        data = tensor.float().numpy()
        if stem.startswith("model.layers."):
            _, _, index, rest = stem.split(".", 3)
            if rest in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.n_head if rest == "self_attn.q_proj" else config.n_query_groups
                data = rotary_permute(data, heads)
            tensors[f"blk.{index}.{LAYER_NAMES[rest]}.{suffix}"] = data
        else:
            tensors[f"{TOP_NAMES[stem]}.{suffix}"] = data
    return tensors


def rotary_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Each head's rows from halves [x0..x(d/2-1) | y0..y(d/2-1)] to pairs [x0 y0 x1 y1 ...] (convert_hf_to_gguf's permute)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def encode_tensor(data: np.ndarray, gguf_type: str):
    """(data, its GGML type): norms and biases stay float32; matrices go to the asked type where their rows allow."""
    import gguf

    if data.ndim == 1 or gguf_type == "f32":
        return data, gguf.GGMLQuantizationType.F32
    quantized = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(gguf_type)
    if quantized is not None and data.shape[-1] % QUANT_BLOCK == 0:
        return gguf.quants.quantize(data, quantized), quantized
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The vocabulary, special ids and chat template, as llama.cpp's tokenizer reads them."""
    import gguf

    described = json.loads(tokenizer.backend.to_str())
    kind = tokenizer.kind
    if kind not in ("char", "bpe"):  # another pre-tokenizer or model would need llama.cpp to know its name
        raise UserError(
            f"GGUF export writes this project's 'char' and 'bpe' tokenizers, not {kind!r}: export --format hf and "
            "convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [None] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    special = {added["content"] for added in described.get("added_tokens", []) if added.get("special")}
    if kind == "char" and SPM_SPACE in vocab:
        raise UserError(f"the vocabulary holds {SPM_SPACE!r}, which llama.cpp's SentencePiece model reads as a space; "
                        "it cannot be written to GGUF")
    for index, token in enumerate(tokens):
        if token is None:  # rows of the embedding past the tokenizer's vocabulary
            tokens[index], special = f"[PAD{index}]", special | {f"[PAD{index}]"}
    types = [gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens]
    if kind == "bpe":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        merges = described["model"]["merges"]
        writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(False)
        writer.add_token_scores([0.0] * len(tokens))
        tokens = [token.replace(" ", SPM_SPACE) if token not in special else token for token in tokens]
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    exported = tokenizer.for_export()
    writer.add_bos_token_id(exported.bos_token_id)
    writer.add_eos_token_id(exported.eos_token_id)
    writer.add_pad_token_id(exported.pad_token_id)
    writer.add_add_bos_token(False)  # this project's models never saw a BOS
    writer.add_add_eos_token(False)
    template = getattr(exported.hf, "chat_template", None)
    if template:
        writer.add_chat_template(template)

