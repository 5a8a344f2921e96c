"""`python -m picogpt_lightning export`: a checkpoint in, a Hugging Face model directory or a GGUF file out."""

import os
from contextlib import contextmanager
from typing import Literal

import torch

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.atomic import write_directory_atomically
from picogpt_lightning.commands.outputs import write_marker, writing_output
from picogpt_lightning.gguf_export import write_gguf
from picogpt_lightning.hf import llama_config, save_pretrained
from picogpt_lightning.hf_adapter import save_lora_export
from picogpt_lightning.lora import LoraSettings
from picogpt_lightning.tokenizer import Tokenizer


def export_gguf(checkpoint_path: str, path: str, gguf_type: str = "f16", overwrite: bool = False) -> tuple:
    """A checkpoint of this project (packed ones dequantized, a LoRA run's folded) -> one GGUF file for llama.cpp."""
    with writing_output(path, overwrite, inputs=[checkpoint_path], written_here=is_gguf):
        checkpoint = checkpoints.load(checkpoint_path)  # a LoRA run's comes back folded
        model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
        with torch.no_grad():
            write_gguf(model, tokenizer, path, gguf_type)
    return model, tokenizer


def is_gguf(path) -> bool:
    """An earlier GGUF export, which --overwrite may replace: the format's magic bytes open the file."""
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def export_checkpoint(checkpoint_path: str, directory: str, overwrite: bool = False, merge_adapters: bool = False) -> bool:
    """A checkpoint of this project -> a Hugging Face directory (model, generation config, tokenizer), atomically.

    A LoRA run's checkpoint gives its base and, in `directory`/adapter, the adapter in peft's format;
    with `merge_adapters`, the one model with the adapters folded in instead. True when an adapter was written."""
    with writing_output(directory, overwrite, inputs=[checkpoint_path], directory=True):
        return write_hf_directory(checkpoint_path, directory, merge_adapters)


def write_hf_directory(checkpoint_path: str, directory: str, merge_adapters: bool) -> bool:
    checkpoint = checkpoints.load(checkpoint_path)  # a LoRA run's comes back folded
    checkpoints.require_unquantized(checkpoint, "a Hugging Face export")
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    llama_config(model.config)  # refuse a model llama cannot express before writing anything
    write = lambda staging: save_pretrained(model, staging, tokenizer)  # noqa: E731
    entry = checkpoint.contents.get(checkpoints.LORA_KEY)
    if entry is not None and not merge_adapters:
        base_state = checkpoints.lora_base(checkpoint.path, entry).state_dict
        adapters = checkpoints.model_state_dict(checkpoint.contents)
        settings = LoraSettings.from_dict(entry["settings"])
        write = lambda staging: save_lora_export(staging, base_state, adapters, model.config, settings, tokenizer)  # noqa: E731
    def write_marked(staging: str) -> None:
        write(staging)
        write_marker(staging, "export")  # what --overwrite looks for before it replaces the directory

    with no_transformers_progress_bar():
        write_directory_atomically(directory, write_marked)
    return entry is not None and not merge_adapters


@contextmanager
def no_transformers_progress_bar():
    """transformers' "Writing model shards" bar counts the one shard a model this small has; the line
    export prints afterwards says what was written. The user's own setting returns afterwards."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def export(
    ckpt: str, out: str, overwrite: bool = False, merge_adapters: bool = False, format: Literal["hf", "gguf"] = "hf",
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f16",
) -> None:
    """Write a checkpoint as a Hugging Face directory (LlamaForCausalLM + tokenizer), or as a GGUF file for llama.cpp.

    Args:
        ckpt: a checkpoint written by training (model config and tokenizer inside); the model must use mlp="swiglu".
        out: the directory to create (hf; AutoModelForCausalLM and AutoTokenizer.from_pretrained(out) load it offline), or the .gguf file (gguf).
        overwrite: replace out if it is an earlier export (never a folder or file of anything else).
        merge_adapters: for a LoRA run's checkpoint, write one model with the adapters folded in; by
            default the base is written to out and the adapter, in peft's format, to out/adapter (a GGUF file always holds them folded).
        format: "hf" (a transformers directory) or "gguf" (one file that llama.cpp, Ollama and llama-cpp-python run).
        gguf_type: the GGUF file's matrices: "f32", "f16", "q8_0" or "q4_0" (norms stay f32); packed checkpoints are dequantized first.
    """
    if format == "gguf":
        model, tokenizer = export_gguf(ckpt, out, gguf_type=gguf_type, overwrite=overwrite)
        # a vocabulary without an end-of-text token ends texts at the newline, which llama.cpp would stop at
        keep_going = " --ignore-eos" if tokenizer.eos_token_id is None else ""
        print(f"wrote {out} ({gguf_type}): llama-cli -m {out} -p 'ROMEO:' -n 100 --temp 0{keep_going}, or an Ollama "
              f"Modelfile with FROM {out} (docs/generation.md)")
        print(f"note: keep llama.cpp's context within {model.config.block_size} tokens (-c {model.config.block_size}); "
              "past it this project slides its window and llama.cpp does not")
        return
    wrote_adapter = export_checkpoint(ckpt, out, overwrite=overwrite, merge_adapters=merge_adapters)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({out!r}) and AutoTokenizer.from_pretrained({out!r}) load it")
    if wrote_adapter:
        adapter = os.path.join(out, "adapter")
        print(f"and its LoRA adapter: PeftModel.from_pretrained(that model, {adapter!r})")
