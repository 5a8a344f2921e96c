"""Running LightningCLI: the one way every recipe trains, from the command line or the pipeline.

Besides Lightning's own behaviour, a run here resumes exactly (data order, schedule, random
state), saves a checkpoint and exits 143/130 on SIGTERM/SIGINT, stops at a non-finite loss,
claims its own version directory (and removes it again when the start fails), and reports
bad input as one `UserError` line before anything is created.
"""

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Union
from unittest.mock import patch

import torch
import torch.distributed as dist
import yaml
from lightning import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import picogpt_lightning.data  # noqa: F401 - imported, the data modules are --data's known subclasses in --help
from picogpt_lightning import checkpoints, resume
from picogpt_lightning.checkpoint_io import AtomicSaveConfigCallback, with_atomic_checkpoint_io
from picogpt_lightning.callbacks import (
    InterruptCheckpoint, LastCheckpoint, NonFiniteLossCheck, RandomStateCheckpoint, add_run_callbacks,
    hide_unactionable_output,
)
from picogpt_lightning import stop_signals
from picogpt_lightning.errors import InputNotFound, UserError, first_line
from picogpt_lightning.modules import PicoGPTModule
from picogpt_lightning.textfiles import config_paths, mentions, read_text
from picogpt_lightning.trainer_checks import check_stage_data, check_trainer_arguments, refusals_in_one_line

PROG = "python -m picogpt_lightning"
RunArgs = Union[List[str], dict]  # a command line after the program name, or a config as data


class CommandLineError(UserError):
    """Bad input on the command line or in a config file, in one line."""


class ShortErrorParser(LightningArgumentParser):
    """jsonargparse's parser, whose errors (pages of usage and union subtypes) become one CommandLineError."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or os.environ.get("PICOGPT_DEBUG"):
            super().error(message, ex)  # raises: a nested parser's error may be caught and another type tried
        parser = getattr(ex, "subcommand_parser", None) or self
        raise CommandLineError(short_parse_error(message, parser)) from None


class PicoGPTCLI(LightningCLI):
    """LightningCLI with the project's checkpoint callbacks, input checks and version directories."""

    def __init__(self, *args, command_line: Optional[List[str]] = None, **kwargs):
        self.command_line = command_line  # None: configured from a dict, so no command line to repeat
        self.claimed: List[Path] = []
        try:
            super().__init__(*args, parser_class=ShortErrorParser, **kwargs)
        except BaseException:
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.global_step == 0:  # the start failed: nothing of this run to keep
                release_version_directory(self.claimed)
            raise

    def add_arguments_to_parser(self, parser) -> None:
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
        if not isinstance(args, dict):
            check_yaml_files(args if args is not None else sys.argv[1:])
        super().parse_arguments(parser, args)
        # the tokenizer's size replaces the model's vocab_size (the link above), so only one the user wrote
        # can disagree with it: parsing again without defaults tells it from the config's default
        self.given_vocab_size = None
        # parsing again costs a few tenths of a second at every start: only where vocab_size may be written
        if mentions("vocab_size", args if args is not None else sys.argv[1:]):
            given = parser.parse_object(args, defaults=False) if isinstance(args, dict) else parser.parse_args(args, defaults=False)
            self.given_vocab_size = given.get(f"{given.get('subcommand')}.model.init_args.config.vocab_size")
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":  # "last": the newest last.ckpt of this run's name
            self.config.fit.ckpt_path = resume.resolve_last(self.config.fit.get("ckpt_path"), self.config.fit.trainer.get("logger"))
        if subcommand is not None:  # before LightningCLI reads the file's hyperparameters (a raw torch.load)
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))
            check_trainer_arguments(subcommand, self.config[subcommand].get("trainer") or {})  # out of range: one line

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's own: it replaces the command's model arguments with the checkpoint's. A resumed fit
        # trains what the command asks instead, and resume.check_resume refuses one that differs
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            logger = self.config.fit.trainer.get("logger")
            resume.check_version_free(self.config.fit.get("ckpt_path"), logger)  # another run's folder is never reused
            resume.continue_version(self.config.fit.get("ckpt_path"), logger)  # a resumed run writes where it lives
            self.claimed = claim_version_directory(logger)

    def instantiate_trainer(self, **kwargs):
        check_vocab_size(self.given_vocab_size, self.datamodule)  # before the Trainer exists: the error is all the user sees
        check_stage_data(self.subcommand, self.datamodule, self.model)  # validate/test/predict: their loader
        if self.subcommand == "fit":  # the same settings as the checkpoint's, or one line naming each difference
            resume.check_resume(self.config.fit.get("ckpt_path"), self.model, self.datamodule)
            # before the Trainer and its logger exist: a refused resume changes nothing (config.yaml included)
            resume.check_steps_left(self.config.fit.get("ckpt_path"), self.config.fit.trainer.get("max_steps"))
        try:
            plugins = with_atomic_checkpoint_io(self._get(self.config_init, "trainer", default={}).get("plugins"))
            trainer = super().instantiate_trainer(**{"plugins": plugins, **kwargs})  # every checkpoint written atomically
        except UserError:
            raise
        except (ValueError, MisconfigurationException) as error:  # the Trainer refusing its own arguments
            raise CommandLineError(f"trainer: {first_line(error)}") from error
        add_run_callbacks(trainer)  # the learning-rate chart and the step progress bar
        stop_signals.forward_to_launched_ranks(trainer)  # a SIGTERM stops the DDP ranks it starts too
        if trainer.strategy.root_device.type == "cuda":
            # TF32 tensor cores for the float32 matmuls left outside autocast (fp32 runs, the loss)
            torch.set_float32_matmul_precision("high")
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        with refusals_in_one_line():  # Lightning refuses some arguments only once the stage runs
            super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, InterruptCheckpoint):
                callback.resume_command = self.resume_command

    def resume_command(self, ckpt_path: str) -> str:
        """The command that continues this run from `ckpt_path`: the same one plus --ckpt_path."""
        if self.command_line is None:  # the config this run saved beside its logs holds everything it was given
            args = ["fit", "--config", os.path.join(self.trainer.log_dir, "config.yaml")]
        else:
            args, skip = [], False
            for arg in self.command_line:
                if skip:
                    skip = False
                elif arg == "--ckpt_path":
                    skip = True
                elif not arg.startswith("--ckpt_path="):
                    args.append(arg)
        return f"{PROG} {shlex.join(args + ['--ckpt_path', ckpt_path])}"


@stop_signals.exits_on_signals()  # from its first line: a signal in any phase exits 128 + the signal (stop_signals.py)
def run_lightning(args: RunArgs) -> LightningCLI:
    """Runs LightningCLI on `args` and returns it (.model, .trainer).

    `args` is a command line without the program name (["fit", "--config", ...]), or, as
    LightningCLI takes it, a subcommand's config as data: {"fit": {"model": ..., "data": ..., "trainer": ...}}.
    On SIGTERM or SIGINT, in any phase, exits with 128 + the signal number (a training run saves first).
    """
    hide_unactionable_output()  # warnings and tips no user can act on
    as_data = isinstance(args, dict)
    own_argv = not as_data and list(args) == sys.argv[1:]
    # LightningCLI warns when it is given arguments while the process has command-line arguments
    # of its own (the pipeline's): those are not for it, so it sees only the program name
    with patch.object(sys, "argv", sys.argv if own_argv else sys.argv[:1]), process_group_ended():
        cli = PicoGPTCLI(
            PicoGPTModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=1337,
            save_config_callback=AtomicSaveConfigCallback,  # config.yaml, whole or absent
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "picogpt"},
                }
            },
            args=None if own_argv else args,
            command_line=None if as_data else list(args),
        )
    return cli


@contextmanager
def process_group_ended():
    """A `ddp` process group left alive until interpreter exit can abort the process there, so it ends with the run."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---- input checks, before anything is created ----------------------------------------------


def check_yaml_files(args: List[str]) -> None:
    """A config file that is not valid YAML, named with its line (jsonargparse names only "<unicode string>")."""
    for path in config_paths(args):  # a missing one jsonargparse reports, or it is inline YAML
        try:
            yaml.safe_load(read_text(path, "config"))  # not UTF-8: one line naming the file and the line
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}" if mark is not None else path
            problem = getattr(error, "problem", None) or first_line(error)
            raise CommandLineError(f"{where}: invalid YAML ({problem})") from None


def check_ckpt_path(ckpt_path) -> None:
    """A --ckpt_path must be a readable Lightning checkpoint, found before any run directory is made."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning resolves these itself
        return
    if not os.path.isfile(ckpt_path):
        raise InputNotFound(
            f"--ckpt_path {ckpt_path} not found; check the path (runs write them under runs/<name>/version_N/checkpoints/)"
        )
    checkpoints.require_training_state(ckpt_path)  # one-line errors: truncated, foreign, weights only


def check_vocab_size(requested: Optional[int], datamodule) -> None:
    """A vocab_size the user set must agree with the tokenizer, which otherwise silently replaces it."""
    tokens = getattr(datamodule, "vocab_size", None)
    if requested is not None and tokens is not None and requested != tokens:
        raise CommandLineError(
            f"model config vocab_size is {requested} but the tokenizer has {tokens} tokens; "
            "leave vocab_size unset (the data sets it) or change the tokenizer"
        )


# ---- version directories ---------------------------------------------------------------------


def claim_version_directory(logger_config) -> List[Path]:
    """Gives this run its own `version_N` directory, created atomically, so runs started at once never share one.

    Returns the directories it created, the version directory last (none when the user chose the
    version, on ranks other than 0, which share rank 0's, and for loggers without versions).
    """
    if not hasattr(logger_config, "get") or "init_args" not in logger_config:
        return []
    init_args = logger_config.init_args
    if init_args.get("version") is not None or any(int(os.environ.get(v, 0)) for v in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return []
    if not logger_config.class_path.endswith(("TensorBoardLogger", "CSVLogger")):
        return []
    root = Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "lightning_logs")
    created = [path for path in reversed([root, *root.parents]) if not path.exists()]
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(numbers, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{version}")  # atomic: exactly one run creates it
            break
        except FileExistsError:
            version += 1
        except FileNotFoundError:  # a failed start beside this one removed the directories it had made
            root.mkdir(parents=True, exist_ok=True)
    init_args["version"] = version
    return created + [root / f"version_{version}"]


def release_version_directory(created: List[Path]) -> None:
    """Removes what `claim_version_directory` created, for a run that failed before its first step.

    The start may have written its config and an empty event file there; a checkpoint is never removed.
    """
    if not created or any(created[-1].rglob("*.ckpt")):
        return
    shutil.rmtree(created[-1], ignore_errors=True)
    for directory in reversed(created[:-1]):
        try:
            directory.rmdir()  # only while empty: another run may have started in it since
        except OSError:
            return


# ---- short parser errors ---------------------------------------------------------------------


def short_parse_error(message: str, parser) -> str:
    """jsonargparse's message (tens of lines of usage and union subtypes) as one line, with a "did you mean"."""
    key, candidates = unknown_key(message, parser)
    if key is None:
        head, _, rest = message.strip().partition("\n")
        return f"{head.strip()} {first_line(ValueError(rest))}" if rest.strip() else first_line(ValueError(head))
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
