"""Command line: LightningCLI for fit/validate/test/predict, plus the project's own commands.

    python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml
    python -m picogpt_lightning <command> --help

Training subcommands go to LightningCLI (picogpt_lightning/lightning_cli.py, imported only
when one runs, so the other commands start without Lightning). The others are functions in
picogpt_lightning/commands/, one module each: jsonargparse turns each one's signature and
docstring into its flags and help, so a new command is one module and one line in COMMANDS.
Only the command that runs is imported: `generate` starts without Lightning, `serve`
without the training stack.
A `UserError` anywhere in a command is printed as its one line; anything else is a bug and
shows its traceback.
"""

import importlib
import inspect
import json
import os
import sys
from typing import Callable, Dict, List, Optional

from picogpt_lightning.errors import UserError, first_line
from picogpt_lightning.stop_signals import exits_on_signals
from picogpt_lightning.textfiles import config_paths, read_text

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a model (python -m picogpt_lightning fit --config configs/pretrain_cpu.yaml)",
    "validate": "run one evaluation over the validation set",
    "test": "run one evaluation over the test set",
    "predict": "run inference over the predict set",
}
# name -> (module in picogpt_lightning.commands, function): imported when the command runs
COMMANDS: Dict[str, tuple] = {
    "pipeline": ("pipeline", "run_pipeline"),
    "generate": ("generate", "generate"),
    "serve": ("serve", "serve"),
    "export": ("export", "export"),
    "quantize": ("quantize", "quantize"),
    "merge": ("merge", "merge"),
    "prepare": ("prepare", "prepare"),
}
OWN_SIGNAL_HANDLING = ("serve",)  # drains its requests on SIGTERM


def command_function(name: str) -> Callable:
    module, function = COMMANDS[name]
    return getattr(importlib.import_module(f"picogpt_lightning.commands.{module}"), function)


def run_command(name: str, args: List[str]) -> None:
    from jsonargparse import CLI

    for path in config_paths(args):  # jsonargparse's UnicodeDecodeError names neither the file nor the fix
        read_text(path, "config")
    function = command_function(name)
    args = join_list_flags(args, getattr(inspect.getmodule(function), "LIST_FLAGS", ()))
    if name in OWN_SIGNAL_HANDLING:
        CLI(function, args=args, prog=f"python -m picogpt_lightning {name}", as_positional=False)
        return
    with exits_on_signals():  # SIGTERM/SIGINT/SIGHUP: one line, exit 128 + the signal, what was being written removed
        CLI(function, args=args, prog=f"python -m picogpt_lightning {name}", as_positional=False)


def join_list_flags(args: List[str], flags) -> List[str]:
    """`--source a b c` (what a shell glob expands to) as the one JSON list jsonargparse reads: `--source ["a","b","c"]`."""
    joined, i = [], 0
    while i < len(args):
        joined.append(args[i])
        if args[i] in flags:
            values = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                values.append(args[i + 1])
                i += 1
            joined.append(values[0] if len(values) == 1 else json.dumps(values))
        i += 1
    return joined


def print_help() -> None:
    print("usage: python -m picogpt_lightning <command> [options]\n")
    print("commands:")
    for name, summary in LIGHTNING_SUBCOMMANDS.items():
        print(f"  {name:<10} {summary}")
    for name in COMMANDS:
        summary = (inspect.getdoc(command_function(name)) or "").partition("\n")[0]
        print(f"  {name:<10} {summary}")
    print("\n'python -m picogpt_lightning <command> --help' lists a command's options.")


def set_thread_defaults() -> None:
    """Threads for small models on a shared CPU, where the user's environment says nothing.

    OpenMP workers spin while they wait: beside another busy process on 2 cores a run crawls
    (1.2 it/s against 14 it/s with one thread; BENCHMARKS.md, "CPU threads under load"). Both
    variables are read when torch loads OpenMP, which `python -m picogpt_lightning` has not done
    yet (the package imports the model on first use); the processes a command starts inherit
    them. The thread count: half the cores, at most 4, as a 128-wide model gains little from more.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, min(4, (os.cpu_count() or 1) // 2))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:  # called from Python after torch was loaded: the count still applies
            sys.modules["torch"].set_num_threads(threads)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    set_thread_defaults()
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS and name not in LIGHTNING_SUBCOMMANDS:
        print_help()
        sys.exit(f"error: unknown command {name!r}")
    try:
        if name in COMMANDS:
            run_command(name, rest)
        else:
            from picogpt_lightning.lightning_cli import run_lightning

            run_lightning([name] + rest)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get("PICOGPT_DEBUG"):
            raise
        sys.exit(f"error: {first_line(user_error)}")


def find_user_error(error: Optional[BaseException]) -> Optional[UserError]:
    """The UserError behind `error`, if that is what went wrong: jsonargparse and Lightning wrap
    exceptions raised inside them, so the chain of causes and contexts is searched."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
