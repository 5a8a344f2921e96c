"""A Hugging Face model folder of the Llama family (LlamaForCausalLM, MistralForCausalLM), read as a checkpoint.

config.json becomes a PicoGPTConfig (hf_config.picogpt_config refuses, in one line, what PicoGPT does not
compute), the tokenizer files a tokenizer dict, and the safetensors weights (one file or shards
named by model.safetensors.index.json) PicoGPT's state dict in the file's own dtype.

The weights are read straight into the tensors the model keeps, q, k and v into slices of the
fused projection: safetensors' mmap keeps a file's pages resident while any tensor of it lives,
so fusing its tensors would hold the weights twice. Read this way, the state dict is the only copy.
"""

import json
import os
from typing import Dict, List, Tuple

import torch

from picogpt_lightning.errors import InputNotFound, UserError, first_line
from picogpt_lightning.hf_config import BLOCK_RENAMES, picogpt_config
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.tokenizer_format import pretrained_tokenizer_dict

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_model_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_model_folder(folder: str) -> Tuple[PicoGPTConfig, Dict[str, torch.Tensor], dict]:
    """(config, PicoGPT state dict, tokenizer dict or None) of a Llama-family folder saved by transformers."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a bad config.json
        raise UserError(f"{folder}/{CONFIG_FILE} cannot be read ({first_line(error)}); pass a folder saved by transformers")
    config = picogpt_config(hf_config)
    entries = tensor_entries(folder)
    state_dict = read_state_dict(entries, config, folder)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)
    return config, state_dict, pretrained_tokenizer_dict(folder) if has_tokenizer else None


# ---- safetensors, read by hand where the fused projection needs it --------------------------


def tensor_entries(folder: str) -> Dict[str, Tuple[str, dict, int]]:
    """{tensor name: (file, its header entry, where the file's data starts)} over every shard."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as file:
            files = sorted(set(json.load(file)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise InputNotFound(
            f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; save the model with save_pretrained "
            "(safetensors, transformers' default)"
        )
    entries = {}
    for name in files:
        path = os.path.join(folder, name)
        header, data_start = safetensors_header(path)
        entries.update({key: (path, entry, data_start) for key, entry in header.items() if key != "__metadata__"})
    return entries


def safetensors_header(path: str) -> Tuple[dict, int]:
    """The JSON header of a safetensors file (8 bytes of length, then the JSON) and where its data starts."""
    if not os.path.isfile(path):
        raise InputNotFound(f"weights file {path} is missing; the folder is incomplete")
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 2 <= length <= os.path.getsize(path) - 8:
            raise UserError(f"{path} is not a safetensors file (its header length is {length}); it may be truncated")
        return json.loads(file.read(length)), 8 + length


def read_into(target: torch.Tensor, entries: Dict[str, Tuple[str, dict, int]], name: str) -> None:
    """Fills `target` (contiguous, of the entry's shape and dtype) with tensor `name`'s bytes."""
    if name not in entries:
        raise UserError(f"the weights lack {name!r}; the folder does not hold a complete Llama-family model")
    path, entry, data_start = entries[name]
    begin, end = entry["data_offsets"]
    if list(target.shape) != entry["shape"] or DTYPES.get(entry["dtype"]) != target.dtype:
        raise UserError(
            f"{name} in {path} is {entry['dtype']} {entry['shape']}, but config.json implies {list(target.shape)}; "
            "the folder's config and weights disagree"
        )
    with open(path, "rb") as file:
        file.seek(data_start + begin)
        if file.readinto(target.view(torch.uint8).view(-1).numpy()) != end - begin:
            raise UserError(f"{path} ends inside {name}; the file is truncated, download it again")


def read_state_dict(entries, config: PicoGPTConfig, folder: str) -> Dict[str, torch.Tensor]:
    """PicoGPT's state dict, each tensor allocated once in the folder's dtype and read into."""
    embedding = entries.get("model.embed_tokens.weight")
    if embedding is None or embedding[1]["dtype"] not in DTYPES:
        raise UserError(f"{folder} has no floating-point model.embed_tokens.weight; is it a Llama-family model?")
    dtype = DTYPES[embedding[1]["dtype"]]
    state_dict = {}

    def read(ours: str, theirs: List[str]) -> None:
        shapes = [entries[name][1]["shape"] if name in entries else None for name in theirs]
        if None in shapes:
            raise UserError(f"the weights lack {theirs[shapes.index(None)]!r}; the folder is incomplete")
        target = torch.empty((sum(shape[0] for shape in shapes), *shapes[0][1:]), dtype=dtype)
        start = 0
        for name, shape in zip(theirs, shapes):  # row blocks of a fused tensor are contiguous slices
            read_into(target[start : start + shape[0]], entries, name)
            start += shape[0]
        state_dict[ours] = target

    read("tok_embeddings.weight", ["model.embed_tokens.weight"])
    read("norm.weight", ["model.norm.weight"])
    if config.tie_weights:
        state_dict["lm_head.weight"] = state_dict["tok_embeddings.weight"]
    else:
        read("lm_head.weight", ["lm_head.weight"])
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        suffixes = ["weight"] + (["bias"] if config.bias else [])
        for suffix in suffixes:
            read(f"{ours}attn.qkv.{suffix}", [f"{theirs}self_attn.{p}_proj.{suffix}" for p in "qkv"])
        for our_name, their_name in BLOCK_RENAMES.items():
            for suffix in ("weight", "bias"):
                if f"{theirs}{their_name}.{suffix}" in entries:
                    read(f"{ours}{our_name}.{suffix}", [f"{theirs}{their_name}.{suffix}"])
    return state_dict
