"""Running LightningCLI: the one way every recipe trains, from the command line or the pipeline.

Kept apart from `cli.py` (the command-line entry point) and `pipeline.py` (which runs
several trainings), so both can call it without importing each other. Besides Lightning's
own behaviour, a run here resumes exactly (data order, schedule, random state), saves a
checkpoint and exits 143/130 on SIGTERM/SIGINT, stops at a non-finite loss, claims its own
version directory, and reports bad input in one short message before anything is created.
"""

import dataclasses
import difflib
import inspect
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import List, Optional
from unittest.mock import patch


PROG = "python -m picogpt_lightning"


class CommandLineError(ValueError):
    """Bad input on the command line or in a config file, in one line."""


def picogpt_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from picogpt_lightning.callbacks import (
        InterruptCheckpoint, LastCheckpoint, NonFiniteLossCheck, RandomStateCheckpoint,
    )

    class ShortErrorParser(LightningArgumentParser):
        def error(self, message: str, ex: Optional[Exception] = None):
            if not self.exit_on_error or os.environ.get("PICOGPT_DEBUG"):
                super().error(message, ex)  # raises: a nested parser's error may be caught and another type tried
            parser = getattr(ex, "subcommand_parser", None) or self
            sys.exit(f"error: {short_parse_error(message, parser)}")

    class PicoGPTCLI(LightningCLI):
        def __init__(self, *args, command_line: Optional[List[str]] = None, **kwargs):
            self.command_line = command_line or []
            super().__init__(*args, parser_class=ShortErrorParser, **kwargs)

        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/loss",
                    "checkpoint.mode": "min",
                    "checkpoint.filename": "best",
                    "checkpoint.save_top_k": 1,
                    "checkpoint.save_last": False,  # last.ckpt is LastCheckpoint's: always the newest state
                    "checkpoint.auto_insert_metric_name": False,
                }
            )
            parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
            parser.add_lightning_class_args(NonFiniteLossCheck, "nonfinite_check")
            parser.add_lightning_class_args(RandomStateCheckpoint, "random_state")
            parser.add_lightning_class_args(InterruptCheckpoint, "interrupt")
            # the tokenizer decides the vocabulary: the model takes its size from the data
            parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size", apply_on="instantiate")

        def parse_arguments(self, parser, args) -> None:
            check_yaml_files(args if args is not None else sys.argv[1:])
            super().parse_arguments(parser, args)
            # the tokenizer's size replaces the model's vocab_size (the link above), so only one the user wrote
            # can disagree with it: parsing again without defaults tells it from the config's default
            given = parser.parse_args(args, defaults=False)
            self.given_vocab_size = given.get(f"{given.get('subcommand')}.model.init_args.config.vocab_size")
            subcommand = self.config.get("subcommand")
            if subcommand is not None:  # before LightningCLI reads the file's hyperparameters (a raw torch.load)
                check_ckpt_path(self.config[subcommand].get("ckpt_path"))

        def before_instantiate_classes(self) -> None:
            if self.subcommand is None:
                return
            if self.subcommand == "fit":
                claim_version_directory(self.config[self.subcommand].trainer.get("logger"))

        def instantiate_trainer(self, **kwargs):
            # checked before the Trainer exists, so the error is all the user sees
            try:
                check_vocab_size(self.given_vocab_size, self.datamodule)
            except CommandLineError:
                release_version_directory(self.config[self.subcommand].trainer.get("logger"))
                raise
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, InterruptCheckpoint):
                    callback.resume_command = self.resume_command

        def resume_command(self, ckpt_path: str) -> str:
            args, skip = [], False
            for arg in self.command_line:
                if skip:
                    skip = False
                elif arg == "--ckpt_path":
                    skip = True
                elif not arg.startswith("--ckpt_path="):
                    args.append(arg)
            return f"{PROG} {shlex.join(args + ['--ckpt_path', ckpt_path])}"

    return PicoGPTCLI


def run_lightning(args: List[str]):
    """Runs LightningCLI on `args` (e.g. ["fit", "--config", ...]) and returns it (.model, .trainer).

    After an interruption (SIGTERM, SIGINT) that saved a checkpoint, exits with 128 + the signal number.
    """
    import torch.distributed as dist
    from lightning import LightningDataModule

    from picogpt_lightning.callbacks import InterruptCheckpoint
    from picogpt_lightning.modules import PicoGPTModule

    # Lightning cannot see that the data module restores the train loader's position (see its state_dict)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    own_argv = args == sys.argv[1:]
    # LightningCLI warns when it is given arguments while the process has command-line arguments
    # of its own (the pipeline's): those are not for it, so it sees only the program name
    with patch.object(sys, "argv", sys.argv if own_argv else sys.argv[:1]):
        cli = picogpt_cli_class()(
            PicoGPTModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "picogpt"},
                }
            },
            args=None if own_argv else args,
            command_line=list(args),
        )
    # a `ddp` process group left alive until interpreter exit can abort the process there
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for callback in getattr(cli.trainer, "callbacks", []):
        if isinstance(callback, InterruptCheckpoint) and callback.exit_code:
            sys.exit(callback.exit_code)
    return cli


# ---- input checks, before anything is created ----------------------------------------------


def check_yaml_files(args: List[str]) -> None:
    """A config file that is not valid YAML, named with its line (jsonargparse names only "<unicode string>")."""
    import yaml

    paths = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            continue  # jsonargparse reports it, or it is inline YAML
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}" if mark is not None else path
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise CommandLineError(f"{where}: invalid YAML ({problem})") from None


def check_ckpt_path(ckpt_path) -> None:
    """A --ckpt_path must be a readable Lightning checkpoint, found before any run directory is made."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning resolves these itself
        return
    from picogpt_lightning import checkpoints

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path} not found; check the path (runs write them under checkpoints/)")
    checkpoints.require_training_state(ckpt_path)  # one-line errors: truncated, foreign, weights only


def check_vocab_size(requested: Optional[int], datamodule) -> None:
    """A vocab_size the user set must agree with the tokenizer, which otherwise silently replaces it."""
    tokens = getattr(datamodule, "vocab_size", None)
    if requested is not None and tokens is not None and requested != tokens:
        raise CommandLineError(
            f"model config vocab_size is {requested} but the tokenizer has {tokens} tokens; "
            "leave vocab_size unset (the data sets it) or change the tokenizer"
        )


def claim_version_directory(logger_config) -> None:
    """Gives this run its own `version_N` directory, created atomically, so runs started at once never share one."""
    if not hasattr(logger_config, "get") or "init_args" not in logger_config:
        return
    init_args = logger_config.init_args
    if init_args.get("version") is not None or any(int(os.environ.get(v, 0)) for v in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return  # the user chose it, or another rank: rank 0 claims and Lightning shares its directory
    if not logger_config.class_path.endswith(("TensorBoardLogger", "CSVLogger")):
        return
    root = Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "lightning_logs")
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(numbers, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{version}")  # atomic: exactly one run creates it
            break
        except FileExistsError:
            version += 1
    init_args["version"] = version


def release_version_directory(logger_config) -> None:
    """Removes the directory `claim_version_directory` made, when a run stops before writing into it."""
    init_args = getattr(logger_config, "init_args", None)
    if init_args is None or init_args.get("version") is None:
        return
    path = Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "lightning_logs") / f"version_{init_args['version']}"
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


# ---- short parser errors ---------------------------------------------------------------------


def short_parse_error(message: str, parser) -> str:
    """jsonargparse's message (tens of lines of usage and union subtypes) as one line, with a "did you mean"."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    key, candidates = unknown_key(message, parser)
    if key is None:
        return " ".join(lines[:2])[:400]
    suggestion = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {suggestion[0]!r}?" if suggestion else "; '--help' lists the options"
    return f"unknown option {key!r}{hint}"


def unknown_key(message: str, parser):
    """(the unknown key, the keys it could have meant) when that is the error, else (None, [])."""
    class_path = re.search(r"given class_path '([^']+)'", message)
    option = re.search(r"Option '([^']+)' is not accepted", message) or re.search(r"unrecognized arguments: --([^=\s]+)", message)
    if class_path and option:  # a key inside model: or data:, which name a class
        parent = re.search(r'Parser key "([^"]+)"', message)
        prefix = f"{parent.group(1)}." if parent else ""
        return prefix + option.group(1), [prefix + name for name in init_parameters(class_path.group(1))]
    options = [s.lstrip("-") for action in parser._actions for s in action.option_strings if s.startswith("--")]
    match = re.search(r"unrecognized arguments: (\S+)", message) or re.search(r"does not accept option '([^']+)'", message)
    if match:
        return match.group(1).lstrip("-").split("=")[0], options
    return None, []


def init_parameters(class_path: str) -> List[str]:
    """The arguments a class accepts, its bases' too where its __init__ passes **kwargs on."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names = []
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters.values() if "__init__" in vars(klass) else []
        for p in parameters:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                names.append(p.name)  # a dataclass argument (the model config) takes dotted keys too
                names += [f"{p.name}.{f.name}" for f in dataclasses.fields(p.annotation)] if dataclasses.is_dataclass(p.annotation) else []
        if "__init__" in vars(klass) and not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names
