"""`python -m picogpt_lightning export`: a checkpoint in, a Hugging Face model directory out."""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.commands.outputs import check_output
from picogpt_lightning.errors import UserError
from picogpt_lightning.hf import llama_config, save_pretrained
from picogpt_lightning.hf_adapter import save_lora_export
from picogpt_lightning.lora import LoraSettings
from picogpt_lightning.tokenizer import Tokenizer

# safetensors and tokenizers write from Rust and raise their own exception types, naming the OS error inside
OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)|code: (\d+)")


def export_checkpoint(checkpoint_path: str, directory: str, overwrite: bool = False, merge_adapters: bool = False) -> bool:
    """A checkpoint of this project -> a Hugging Face directory (model, generation config, tokenizer), atomically.

    A LoRA run's checkpoint gives its base and, in `directory`/adapter, the adapter in peft's format;
    with `merge_adapters`, the one model with the adapters folded in instead. True when an adapter was written."""
    check_output(directory, overwrite, inputs=[checkpoint_path], directory=True)
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
    with no_transformers_progress_bar():
        write_directory_atomically(directory, write)
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


def write_directory_atomically(directory: str, write: Callable[[str], None]) -> None:
    """`write(staging)` into a temporary directory beside `directory`, fsynced, then renamed into its place.

    The temporary directory shares `directory`'s parent, so every rename stays on one filesystem.
    An existing `directory` is moved aside, the new one renamed in, and only then the old one
    deleted: a failure at any moment leaves the previous directory (or none), never a part of one,
    and one line naming the path and the cause.
    """
    target = Path(directory).absolute()
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        write(str(staging))
        sync_tree(staging)
        replace_directory(staging, target)
        staging = None
    except Exception as error:  # noqa: BLE001 - a failed write becomes one line; anything else is re-raised
        cause = os_error(error)
        if cause is None:
            raise
        raise checkpoints.write_error(directory, cause) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def replace_directory(new: Path, target: Path) -> None:
    """Renames `new` to `target`; an existing `target` is moved aside first and deleted once `new` is in place."""
    if not os.path.lexists(target):
        os.rename(new, target)
        checkpoints.sync_directory(str(target.parent))
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.rename(target, aside / target.name)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(aside / target.name, target)  # the previous export back in its place
            raise
    except OSError:
        aside.rmdir()
        raise
    checkpoints.sync_directory(str(target.parent))
    shutil.rmtree(aside, ignore_errors=True)


def sync_tree(directory: Path) -> None:
    """fsyncs every file under `directory` and the directories themselves, before the rename publishes them."""
    for root, _, names in os.walk(directory):
        for name in names:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        checkpoints.sync_directory(root)


def os_error(error: BaseException):
    """The OSError behind a failed write: in the exception's chain, or named in a Rust library's message."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen and not isinstance(cause, UserError):
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    match = OS_ERROR_IN_MESSAGE.search(str(error)) if not isinstance(error, UserError) else None
    if match:
        number = int(match.group(1) or match.group(2))
        return OSError(number, os.strerror(number))
    return None


def export(ckpt: str, out: str, overwrite: bool = False, merge_adapters: bool = False) -> None:
    """Write a checkpoint as a Hugging Face directory (LlamaForCausalLM + tokenizer) for from_pretrained.

    Args:
        ckpt: a checkpoint written by training (model config and tokenizer inside); the model must use mlp="swiglu".
        out: the directory to create; AutoModelForCausalLM and AutoTokenizer.from_pretrained(out) load it offline.
        overwrite: replace out if it already exists.
        merge_adapters: for a LoRA run's checkpoint, write one model with the adapters folded in; by
            default the base is written to out and the adapter, in peft's format, to out/adapter.
    """
    wrote_adapter = export_checkpoint(ckpt, out, overwrite=overwrite, merge_adapters=merge_adapters)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({out!r}) and AutoTokenizer.from_pretrained({out!r}) load it")
    if wrote_adapter:
        adapter = os.path.join(out, "adapter")
        print(f"and its LoRA adapter: PeftModel.from_pretrained(that model, {adapter!r})")
