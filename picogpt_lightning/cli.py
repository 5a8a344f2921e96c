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
import time
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
    """Threads for small models on a CPU that may be shared, where the user's environment says nothing.

    Measured (docs/training-and-resuming.md, "Threads"; BENCHMARKS.md, "CPU training against
    nanoGPT"): on idle cores, one thread per core whose OpenMP workers spin briefly between
    parallel regions (libgomp's default) is fastest; beside a busy process, extra threads wait on
    cores they do not get and one thread is fastest. So the count is the cores idle now (read from
    /proc/stat over 50 ms; at most 4, as a 128-wide model gains little from more), and when that
    is one, workers sleep (OMP_WAIT_POLICY=PASSIVE). All are read when torch loads OpenMP, which
    `python -m picogpt_lightning` has not done yet; the processes a command starts inherit them.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return  # the user chose the count; a wait policy they set stays theirs too
    threads = max(1, min(4, idle_cores()))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:  # called from Python after torch was loaded: the count still applies
        sys.modules["torch"].set_num_threads(threads)


def idle_cores(interval: float = 0.05) -> int:
    """How many of this process's cores were idle over `interval` seconds (all of them where /proc/stat is missing)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def busy_and_total():
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(interval)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return cores
    machine_cores = os.cpu_count() or cores
    busy = machine_cores * (busy_after - busy_before) / max(1, total_after - total_before)
    return min(cores, int(machine_cores - busy + 0.5))


def main(argv: Optional[List[str]] = None) -> None:
    with exits_on_signals():  # from the first moment: a signal while the command still imports is one line too
        dispatch(list(sys.argv[1:] if argv is None else argv))


def dispatch(argv: List[str]) -> None:
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
    except BrokenPipeError:  # the reader went away (`generate ... | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        sys.exit(128 + 13)  # as SIGPIPE would
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
