"""Resuming a run exactly, or refusing to: what `fit --ckpt_path` checks and decides before it trains.

Lightning resumes whatever it is given. LightningCLI replaces the command's model arguments
with the ones stored in the checkpoint, and restoring the optimizer's state overwrites the
learning rate, betas and weight decay the command asked for, so a changed width, dropout or
weight decay would be dropped without a word; a changed batch size or sample mode would
apply the stored sample position to other batches. Here a resumed run trains what its command
asks (lightning_cli.py skips LightningCLI's replacement for fit), and `check_resume` makes
sure that is what the checkpoint was trained with: the module's and the data module's class
and every argument, and the tokenizer. Any difference is refused in one line naming each field.

A resumed run also keeps writing where its checkpoint lives (`continue_version`), and
`--ckpt_path last` means the newest `last.ckpt` of the run's name (`resolve_last`).
"""

import dataclasses
import inspect
import os
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from picogpt_lightning.tokenizer_format import same_tokens
from picogpt_lightning import checkpoints
from picogpt_lightning.errors import InputNotFound, UserError
from picogpt_lightning.modules.data_link import data_tokenizer
from picogpt_lightning.tokenizer import Tokenizer

# arguments that change how fast a run goes or where it reads from, not what it trains: they may differ
FREE_ARGUMENTS = {"model": {"compile"}, "data": {"num_workers", "cache_dir"}}
CLASS_KEY = "_class_path"  # where LightningCLI stores a module's class beside its arguments
VERSION = re.compile(r"version_(\d+)")


class ResumeMismatch(UserError):
    """A checkpoint that the command would not resume exactly, with every field that differs."""


# ---- where a resumed run reads and writes ---------------------------------------------------


def run_root(logger_config) -> Optional[Path]:
    """<save_dir>/<name>, the directory of the run's versions, for the loggers that have versions."""
    if not hasattr(logger_config, "get") or "init_args" not in logger_config:
        return None
    if not logger_config.class_path.endswith(("TensorBoardLogger", "CSVLogger")):
        return None
    init_args = logger_config.init_args
    return Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "lightning_logs")


def resolve_last(ckpt_path, logger_config):
    """`last`: the newest runs/<name>/version_*/checkpoints/last.ckpt (by time written, then version)."""
    if ckpt_path != "last":
        return ckpt_path
    root = run_root(logger_config)
    if root is None:
        raise UserError(
            "--ckpt_path last looks for the run's last.ckpt under the logger's save_dir and name, but this run's "
            "trainer.logger is not a TensorBoardLogger or CSVLogger; pass the checkpoint's path instead"
        )
    found = [path for path in root.glob("version_*/checkpoints/last.ckpt") if VERSION.fullmatch(path.parent.parent.name)]
    if not found:
        raise InputNotFound(
            f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt; check trainer.logger's save_dir and "
            "name, or pass the checkpoint's path"
        )
    newest = max(found, key=lambda path: (path.stat().st_mtime, int(VERSION.fullmatch(path.parent.parent.name).group(1))))
    return str(newest)


def continue_version(ckpt_path, logger_config) -> Optional[int]:
    """A checkpoint of this run's name (<save_dir>/<name>/version_N/checkpoints/) continues in version_N.

    Sets the logger's version to N, so no new version is claimed and the logs, config and
    checkpoints stay in the directory the resume command names; returns N, or None when the
    checkpoint lies elsewhere or the user chose the version.
    """
    root = run_root(logger_config)
    if root is None or not isinstance(ckpt_path, (str, os.PathLike)) or not os.path.isfile(ckpt_path):
        return None
    if logger_config.init_args.get("version") is not None:
        return None
    directory = Path(ckpt_path).resolve().parent
    match = VERSION.fullmatch(directory.parent.name)
    if directory.name != "checkpoints" or match is None or directory.parent.parent != root.resolve():
        return None
    logger_config.init_args["version"] = int(match.group(1))
    expect_own_checkpoints(directory)
    return logger_config.init_args["version"]


def expect_own_checkpoints(directory: Path) -> None:
    """ModelCheckpoint warns of any non-empty directory it will write to: this one holds the run being resumed."""
    name = re.escape(os.path.join(directory.parent.name, directory.name))
    warnings.filterwarnings("ignore", message=rf"Checkpoint directory .*{name} exists and is not empty")


def check_version_free(ckpt_path, logger_config) -> None:
    """An explicit logger version whose folder already holds a run is refused, unless this run resumes a checkpoint
    of that folder: the new run would replace its config.yaml, last.ckpt and best.ckpt."""
    root = run_root(logger_config)
    version = logger_config.init_args.get("version") if root is not None else None
    if version is None or any(int(os.environ.get(v, 0)) for v in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return  # DDP ranks other than 0 share the folder rank 0 has made
    directory = root / (version if isinstance(version, str) else f"version_{version}")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if isinstance(ckpt_path, (str, os.PathLike)) and os.path.isfile(ckpt_path):
        if directory.resolve() in Path(ckpt_path).resolve().parents:
            expect_own_checkpoints(Path(ckpt_path).resolve().parent)
            return  # resuming the run that lives there
    raise UserError(
        f"--trainer.logger.init_args.version {version}: {directory} already holds a run, which this one would "
        f"overwrite; resume it with --ckpt_path {directory / 'checkpoints' / 'last.ckpt'}, choose another version, "
        "or leave version unset (a new run takes the next free one)"
    )


def check_steps_left(ckpt_path, max_steps) -> None:
    """Resuming a checkpoint at or past max_steps would train nothing, yet rewrite the run's config.yaml: refused."""
    if not isinstance(ckpt_path, (str, os.PathLike)) or not os.path.isfile(ckpt_path):
        return
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        return  # -1 or unset: no limit by steps
    stored = checkpoints.read_file(os.fspath(ckpt_path), mmap=True)  # mapped: the weights are not read
    step = stored.get("global_step") if isinstance(stored, dict) else None
    if isinstance(step, int) and max_steps <= step:
        raise UserError(
            f"--trainer.max_steps {max_steps} is at or below the step of {ckpt_path} ({step}), so resuming would train "
            f"nothing; give a max_steps above {step} to train on, or use the checkpoint as it is"
        )


# ---- what a resumed run trains --------------------------------------------------------------


def check_resume(ckpt_path, model, datamodule) -> None:
    """Refuses, in one line naming each field and its two values, a checkpoint the command would not resume exactly."""
    if not isinstance(ckpt_path, (str, os.PathLike)) or not os.path.isfile(ckpt_path):
        return  # "best", "hpc", "registry": Lightning's own
    stored = checkpoints.read_file(os.fspath(ckpt_path), mmap=True)  # mapped: the weights are not read
    if not isinstance(stored, dict):
        return  # check_ckpt_path refused it already
    found = differences("model", stored.get("hyper_parameters"), getattr(model, "hparams", None), argument_defaults(model))
    found += differences(
        "data", stored.get("datamodule_hyper_parameters"), getattr(datamodule, "hparams", None), argument_defaults(datamodule)
    )
    found += tokenizer_difference(stored.get(checkpoints.TOKENIZER_KEY), command_tokenizer(model, datamodule))
    if found:
        listed = [f"{field} {before} (checkpoint) vs {after} (command)" for field, before, after in found[:1]]
        listed += [f"{field} {before} vs {after}" for field, before, after in found[1:]]
        fresh = f" from its weights with --model.init_args.init_from {ckpt_path}" if "init_from" in model.hparams else ""
        raise ResumeMismatch(
            f"cannot resume {ckpt_path}: {', '.join(listed)}; rerun with the checkpoint's settings or start a new run{fresh}"
        )


Difference = Tuple[str, str, str]  # (field, its value in the checkpoint, its value in the command)


def differences(section: str, stored, requested, defaults: Optional[Dict[str, Any]] = None) -> List[Difference]:
    """Each argument of `section` that differs; another class differs in its class alone.

    An argument the checkpoint lacks but the command leaves at its default (one added to the
    project after the checkpoint was written) is no difference: the run computes what it did."""
    stored, requested = arguments(stored) or {}, arguments(requested) or {}
    stored_class, requested_class = stored.pop(CLASS_KEY, None), requested.pop(CLASS_KEY, None)
    if stored_class is not None and stored_class != requested_class:
        # another class's arguments mean other things: naming them all would bury the difference that matters
        return [(f"{section}.class_path", str(stored_class), str(requested_class))]
    free = FREE_ARGUMENTS.get(section, set())
    defaults = defaults or {}
    keys = [
        key for key in {**stored, **requested}
        if key.split(".")[0] not in free
        and not (key not in stored and key in defaults and requested.get(key) == defaults[key])
    ]
    return [
        (f"{section}.{key}", shown(stored, key), shown(requested, key))
        for key in keys
        if key not in stored or key not in requested or stored[key] != requested[key]
    ]


def argument_defaults(obj) -> Dict[str, Any]:
    """{dotted.key: default} of the constructor arguments of `obj`'s class and its bases, and of the
    fields of an argument typed as a dataclass (a model's PicoGPTConfig, a LoRA run's settings)."""
    defaults: Dict[str, Any] = {}
    for cls in reversed(type(obj).__mro__):
        init = cls.__dict__.get("__init__")
        try:
            parameters = inspect.signature(init).parameters.values() if init is not None else []
            hints = typing.get_type_hints(init) if init is not None else {}
        except (TypeError, ValueError, NameError):  # a builtin's, or annotations that do not resolve
            continue
        for parameter in parameters:
            if parameter.default is not inspect.Parameter.empty:
                defaults[parameter.name] = plain(parameter.default)
            for kind in (hints.get(parameter.name), *typing.get_args(hints.get(parameter.name))):
                if dataclasses.is_dataclass(kind) and isinstance(kind, type):
                    defaults.update({
                        f"{parameter.name}.{field.name}": plain(field.default)
                        for field in dataclasses.fields(kind) if field.default is not dataclasses.MISSING
                    })
    return defaults


def shown(values: Dict[str, Any], key: str) -> str:
    return repr(values[key]) if key in values else "unset"


def arguments(hparams) -> Optional[Dict[str, Any]]:
    """A module's saved hyperparameters as {dotted.key: plain value}, without Lightning's private entries."""
    if hparams is None:
        return None
    plain_values = plain(dict(hparams))
    return flatten({key: value for key, value in plain_values.items() if key == CLASS_KEY or not key.startswith("_")})


def plain(value):
    """Dataclasses (a PicoGPTConfig saved by a module built in Python), mappings and tuples as dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def flatten(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def command_tokenizer(model, datamodule) -> Optional[Tokenizer]:
    """The tokenizer the run will train with: the data's when it has one of its own, else the model's (its init_from)."""
    try:
        tokenizer = data_tokenizer(datamodule)
    except UserError:  # data that takes its tokenizer from the model, which has not handed it over yet
        tokenizer = None
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def tokenizer_difference(stored: Optional[dict], requested: Optional[Tokenizer]) -> List[Difference]:
    """Token ids mean nothing under another tokenizer, even one of the same size (another corpus's characters)."""
    if stored is None or requested is None or same_tokens(requested.to_dict(), stored):
        return []
    before, after = describe(Tokenizer.from_dict(stored)), describe(requested)
    return [("tokenizer", before, f"another {after}" if after == before else after)]


def describe(tokenizer: Tokenizer) -> str:
    return f"{tokenizer.kind!r} of {tokenizer.vocab_size} tokens"
