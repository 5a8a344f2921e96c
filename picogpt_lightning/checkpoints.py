"""The one place that reads and writes checkpoint files.

Four formats hold a PicoGPT, and `load` reads each of them once into a `Checkpoint`:

- a Lightning `.ckpt` of any module here: the trained model's weights under `state_dict`
  with the `model.` prefix (a teacher's or reference model's weights, stored under other
  prefixes, are left out), the model config and the tokenizer beside it;
- a file written by `save` (and `PicoGPT.save`): config, weights and, when given, the tokenizer;
- a bare state dict (`torch.save(model.state_dict(), path)`): weights only, so the caller
  supplies the config;
- a packed quantized file written by `save_quantized` (the `quantize` command): a `save` file
  whose linear layers hold packed NF4, int8, int4 or BitNet codes and scales, described by its
  `picogpt_quantization` entry, so loading builds the same packed layers before the weights
  (picogpt_lightning/quant/packing.py packs them the same way both times).

A local Hugging Face model folder of the Llama family is a fifth source (hf_folder.py): config.json,
safetensors weights and the tokenizer files, read into the same `Checkpoint`.

Files are read with `torch.load(weights_only=True)`: tensors, plain containers and this
project's own config type only, so a planted pickle cannot run code. Everything else asks
this module: the model package knows nothing of Lightning's layout.
"""

import hashlib
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from picogpt_lightning.atomic import WriteError, sync_directory, write_atomically, write_error  # noqa: F401 (callers write through here)
from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.hf_folder import is_model_folder, read_model_folder
from picogpt_lightning.lora import LoraSettings, fold
from picogpt_lightning.model.config import PicoGPTConfig
from picogpt_lightning.quant.packing import QUANTIZATION_METHODS, build_packed_layers

CONFIG_KEY = "picogpt_config"  # PicoGPTConfig.to_dict()
TOKENIZER_KEY = "picogpt_tokenizer"  # Tokenizer.to_dict()
STATE_DICT_KEY = "state_dict"
QUANTIZATION_KEY = "picogpt_quantization"  # {"method": "nf4" | "int8" | "int4" | "bitnet", ...}: quant/packing.py
MODEL_PREFIX = "model."  # LightningModules here keep the trained PicoGPT as `self.model`
COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps modules under this attribute name
LORA_KEY = "picogpt_lora"  # {"settings": LoraSettings.to_dict(), "base": path, "base_sha256": ...}: adapters only
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"  # in every checkpoint the Lightning Trainer writes
# fields that change how a model is trained, not what it computes: they may differ between
# a stored config and the one a run asks for
TRAINING_ONLY_FIELDS = ("dropout", "neftune_noise_alpha")
FINITE_CHECK_SLICE = 1 << 20  # elements checked for NaN/inf at once

# Lightning stores hyperparameters beside the weights, a PicoGPTConfig among them; allowing the
# type lets torch.load(weights_only=True) read this project's checkpoints, Lightning's resume too
torch.serialization.add_safe_globals([PicoGPTConfig, LoraSettings])


class CheckpointError(UserError):
    """A checkpoint file that cannot be used, with the file's name and the fix in one line."""


@dataclass
class Checkpoint:
    """What one checkpoint file holds, read once; `PicoGPT.from_checkpoint` and
    `Tokenizer.from_checkpoint` accept it in place of a path, so a command reads a file once."""

    path: str
    state_dict: Dict[str, torch.Tensor]  # the trained model's weights, prefixes removed
    config: Optional[PicoGPTConfig]  # None for a bare state dict
    tokenizer_dict: Optional[dict]  # Tokenizer.to_dict(), when the file has one
    contents: Dict[str, Any] = field(repr=False)  # the whole file, for what a recipe stored beside
    lent: bool = field(default=False, repr=False)  # its tensors became a model's parameters (load_weights(assign))

    @property
    def quantization(self) -> Optional[dict]:
        """How the file's linear layers are packed (its QUANTIZATION_KEY entry), None for full precision."""
        return self.contents.get(QUANTIZATION_KEY)

    @property
    def global_step(self) -> int:
        return int(self.contents.get("global_step", 0))

    @property
    def datamodule_hparams(self) -> Dict[str, Any]:
        """The data module's own arguments, without the class path LightningCLI stores beside them."""
        stored = self.contents.get("datamodule_hyper_parameters") or {}
        return {key: value for key, value in stored.items() if not key.startswith("_")}

    def require_tokenizer_dict(self) -> dict:
        if self.tokenizer_dict is None:
            raise CheckpointError(
                f"{self.path} has no {TOKENIZER_KEY!r} entry: it was not saved by a picogpt_lightning module "
                "with a tokenizer, so build the tokenizer explicitly"
            )
        return self.tokenizer_dict

    def resolve_config(self, config: Optional[PicoGPTConfig] = None) -> PicoGPTConfig:
        """The model's config: the stored one, or `config`, which must then describe the same architecture."""
        if config is None:
            if self.config is None:
                raise CheckpointError(
                    f"{self.path} holds no model config ({CONFIG_KEY!r}); pass config=PicoGPTConfig(...) "
                    "or load a checkpoint written by this project"
                )
            return self.config
        if self.config is not None:
            check_same_architecture(self.config, config, self.path)
        return config

    def load_weights(self, model: torch.nn.Module, strict: bool = True, assign: bool = False) -> None:
        """Loads the weights into `model`; a packed quantized file first swaps its linear layers for packed ones.
        `assign`: the tensors become the parameters (a model built on the meta device), none copied."""
        if not self.state_dict:
            raise CheckpointError(f"{self.path} holds no model weights; pass a checkpoint written by training or PicoGPT.save")
        if self.quantization is not None:
            build_packed_layers(model, self.quantization, self.path)
        try:
            model.load_state_dict(self.lend_state_dict() if assign else self.state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            raise CheckpointError(f"{self.path} does not match the model config: {describe_load_error(error)}") from None


    def lend_state_dict(self) -> Dict[str, torch.Tensor]:
        """The tensors, to become one model's parameters; a second model gets copies, so that
        training one (a DPO policy) never moves another built from the same file (its reference)."""
        if self.lent:
            return {name: tensor.clone() for name, tensor in self.state_dict.items()}
        self.lent = True
        return self.state_dict


def load(path) -> Checkpoint:
    """Reads a checkpoint file of any of the four formats (a Checkpoint passes through); one-line errors name the file."""
    if isinstance(path, Checkpoint):
        return path
    path = os.fspath(path)
    if is_model_folder(path):  # a Hugging Face Llama/Mistral folder
        config, state_dict, tokenizer_dict = read_model_folder(path)
        check_finite(path, state_dict)
        return Checkpoint(path, state_dict, config, tokenizer_dict, {})
    if os.path.isdir(path):
        raise InputNotFound(
            f"{path} is a folder without config.json; pass a checkpoint file of this project or a Hugging Face "
            "model folder (config.json, model.safetensors, tokenizer files)"
        )
    if not os.path.isfile(path):
        raise InputNotFound(
            f"checkpoint not found: {path}; check the path (runs write them under runs/<name>/version_N/checkpoints/, "
            "or pass a Hugging Face model folder)"
        )
    contents = read_file(path)
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path} holds a {type(contents).__name__}, not a checkpoint of this project")
    state_dict = model_state_dict(contents)
    stored_config = contents.get(CONFIG_KEY)
    config = None
    if stored_config is not None:
        try:
            config = PicoGPTConfig.from_dict(dict(stored_config))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path} holds a model config this version cannot read: {error}") from None
    if LORA_KEY in contents:  # a LoRA run keeps its adapters only: fold them into the base it names
        state_dict = fold_adapters(path, contents[LORA_KEY], state_dict)
    check_finite(path, state_dict)
    return Checkpoint(path, state_dict, config, contents.get(TOKENIZER_KEY), contents)


def check_finite(path: str, state_dict: Dict[str, torch.Tensor]) -> None:
    """Weights holding NaN or infinity (a diverged run, a damaged file) would generate garbage without a word."""
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            continue
        # a slice at a time: isfinite works in float32, which would take twice a bf16 embedding's memory at once
        bad = sum(int((~torch.isfinite(part)).sum()) for part in tensor.reshape(-1).split(FINITE_CHECK_SLICE))
        if bad:
            raise CheckpointError(
                f"{path}: tensor {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the run diverged or "
                "the file is damaged: use an earlier checkpoint"
            )


def lora_base(path: str, entry: dict) -> "Checkpoint":
    """The base checkpoint a LoRA run's adapters belong to, refused in one line if missing or changed."""
    base_path = entry["base"]
    if not os.path.exists(base_path):
        raise InputNotFound(
            f"{path} holds LoRA adapters only, and their base model {base_path} (the run's init_from) is gone; "
            "put it back, or use a checkpoint exported with --merge_adapters true"
        )
    if file_sha256(base_path) != entry["base_sha256"]:
        raise CheckpointError(
            f"{path} holds LoRA adapters trained on another version of {base_path} (its contents changed); "
            "restore the base the run started from"
        )
    return load(base_path)


def fold_adapters(path: str, entry: dict, adapters: dict) -> dict:
    return fold(lora_base(path, entry).state_dict, adapters, LoraSettings.from_dict(entry["settings"]))


def file_sha256(path: str) -> str:
    """The SHA-256 of a checkpoint file, or of a model folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    for name in names:
        member = os.path.join(path, name) if name else path
        if not os.path.isfile(member) or name.startswith("."):
            continue
        digest.update(name.encode())
        with open(member, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def require_training_state(path) -> None:
    """Refuses, in one line, a weights-only file (`save`, `merge`) given where Lightning resumes a run.

    Lightning's `--ckpt_path` restores the loops, optimizer and schedule too, which only its own
    checkpoints hold; "last", "best" and missing paths are left for Lightning to resolve.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return
    contents = read_file(os.fspath(path), mmap=True)  # mapped: the weights themselves are not read
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path} holds a {type(contents).__name__}, not a checkpoint of this project")
    if LIGHTNING_VERSION_KEY not in contents:
        raise CheckpointError(
            f"{path} holds weights only (written by PicoGPT.save or the merge command), not a Lightning training "
            f"state to resume; start from its weights with --model.init_args.init_from {path} instead of --ckpt_path"
        )


def read_file(path: str, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means one of two things to the user
        if "GLOBAL" in str(error) or "Unsupported global" in str(error):  # a type outside the allow-list
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and this project's types, and loading them "
                "could run code; if you trust its source, re-save it with torch.load(path, weights_only=False) "
                "and torch.save of its tensors"
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}); it may be truncated or corrupted"
        ) from None


def holds_entry(path, key: str) -> bool:
    """Whether `path` is a checkpoint file with the entry `key` (a packed file's quantization, a merge's sources)."""
    try:
        contents = read_file(os.fspath(path), mmap=True)  # mapped: the weights are not read
    except CheckpointError:
        return False
    return isinstance(contents, dict) and key in contents


def model_state_dict(contents: dict) -> Dict[str, torch.Tensor]:
    """The trained model's tensors, without Lightning's `model.` or torch.compile's `_orig_mod.` prefixes."""
    state_dict = contents.get(STATE_DICT_KEY, contents)
    if not isinstance(state_dict, dict):
        return {}
    tensors = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    if any(key.startswith(MODEL_PREFIX) for key in tensors):
        # a Lightning checkpoint: only the trained model, not a teacher or a reference model beside it
        tensors = {key: value for key, value in tensors.items() if key.startswith(MODEL_PREFIX)}
        consume_prefix_in_state_dict_if_present(tensors, MODEL_PREFIX)
    return strip_compile_prefix(tensors)


def strip_compile_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state_dict.items()}


def architecture_differences(stored: PicoGPTConfig, requested: PicoGPTConfig) -> Dict[str, tuple]:
    """{field: (stored, requested)} for every field that changes what the model computes."""
    return {
        f.name: (getattr(stored, f.name), getattr(requested, f.name))
        for f in fields(PicoGPTConfig)
        if f.name not in TRAINING_ONLY_FIELDS and getattr(stored, f.name) != getattr(requested, f.name)
    }


def check_same_architecture(stored: PicoGPTConfig, requested: PicoGPTConfig, path: str) -> None:
    differences = architecture_differences(stored, requested)
    if differences:
        listed = ", ".join(f"{name} {a!r} (checkpoint) vs {b!r} (requested)" for name, (a, b) in differences.items())
        raise CheckpointError(
            f"{path} does not match the model config, its architecture differs: {listed}; use the checkpoint's config "
            "(leave config unset) or a checkpoint of this architecture"
        )


def require_unquantized(checkpoint: Checkpoint, purpose: str) -> None:
    """Refuses a packed quantized file where full-precision weights are needed (training, export, quantizing)."""
    if checkpoint.quantization is not None:
        raise CheckpointError(
            f"{checkpoint.path} is already quantized ({checkpoint.quantization.get('method')!r}) and cannot be used for "
            f"{purpose}; pass the full-precision checkpoint it was made from"
        )


def save_quantized(path, model: torch.nn.Module, quantization: dict, tokenizer=None, **extra: Any) -> None:
    """Writes a model whose linear layers are already packed (quantize_nf4 or pack_bitnet) with what rebuilds them."""
    if quantization.get("method") not in QUANTIZATION_METHODS:
        raise UserError(f"quantization method must be one of {QUANTIZATION_METHODS}, got {quantization.get('method')!r}")
    save(path, model, tokenizer, **{QUANTIZATION_KEY: dict(quantization), **extra})


def describe_load_error(error: RuntimeError) -> str:
    """load_state_dict's message in one line: which keys are missing or unexpected, which shapes differ."""
    lines = [line.strip() for line in str(error).strip().splitlines()[1:] if line.strip()]
    summary = "; ".join(lines) or str(error).strip()
    return summary if len(summary) <= 400 else summary[:400] + " ..."


def save(path, model: torch.nn.Module, tokenizer=None, **extra: Any) -> None:
    """Writes config, weights, the tokenizer (if given) and `extra` entries atomically: a file is whole or absent."""
    payload = {CONFIG_KEY: model.config.to_dict(), STATE_DICT_KEY: model.state_dict(), **extra}
    if tokenizer is not None:
        payload[TOKENIZER_KEY] = tokenizer.to_dict()
    write_atomically(os.fspath(path), lambda file: torch.save(payload, file))
