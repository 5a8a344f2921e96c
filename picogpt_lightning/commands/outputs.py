"""The check every command that writes a file or directory makes before it reads anything, and the hold it keeps
on the output while it writes."""

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from picogpt_lightning.atomic import exclusive_writer, recover_directory, remove_stale_temporaries
from picogpt_lightning.errors import UserError

OUTPUT_MARKER = ".picogpt-output"  # in a directory a command wrote: --overwrite may replace it, and nothing else


def check_output(out, overwrite: bool, inputs: Iterable = (), directory: bool = False,
                 written_here: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuses, in one line, an `out` that already exists (unless `overwrite`) or that would replace an input.

    An output that is one of the command's inputs, or a directory holding one, is refused even
    with `overwrite`: replacing it would destroy what is being read. So is the working directory
    or one above it, which a command replaces by moving it aside. A directory output
    (`directory=True`) may be an existing empty directory. `--overwrite` replaces only an earlier
    output of the same command: `written_here(path)` says whether `out` is one (a directory: its
    OUTPUT_MARKER), so a folder or file of anything else is never deleted.
    """
    target = Path(out).resolve()
    for source in inputs:
        path = Path(source).resolve()
        if path == target or target in path.parents:
            holds = "is" if path == target else "is a directory holding"
            raise UserError(f"--out {out} {holds} the input {source}; write the result to another path")
    working = Path.cwd().resolve()
    if target == working or target in working.parents:
        holds = "is" if target == working else "holds"
        raise UserError(f"--out {out} {holds} the working directory; name a new directory to write, such as {out}/result")
    if not target.exists():
        return
    if directory and target.is_dir() and not any(target.iterdir()):
        return
    if not directory and target.is_dir():
        raise UserError(f"--out {out} is a directory; name the file to write")
    if not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite true")
    if written_here is None:
        written_here = has_marker if directory else (lambda path: True)
    if not written_here(target):
        what = "a folder of other files" if target.is_dir() else "a file this command did not write"
        raise UserError(f"--out {out} is {what}; --overwrite replaces only an earlier output of this command, "
                        "so choose another --out")


def has_marker(directory: Path) -> bool:
    """Whether `directory` is a command's output as it wrote it: its marker, naming every entry there is now
    (a file added since, the user's own, would be lost by replacing it)."""
    try:
        written = set(json.loads((directory / OUTPUT_MARKER).read_text()).get("entries", ()))
    except (OSError, ValueError, AttributeError):
        return False
    return {entry.name for entry in directory.iterdir()} - {OUTPUT_MARKER} <= written


def write_marker(directory: str, command: str) -> None:
    """The OUTPUT_MARKER in a directory written whole (its staging directory, renamed into place), naming its entries."""
    entries = sorted(name for name in os.listdir(directory) if name != OUTPUT_MARKER)
    with open(os.path.join(directory, OUTPUT_MARKER), "w") as file:  # inside a staging directory fsynced whole
        json.dump({"written_by": f"python -m picogpt_lightning {command}", "entries": entries}, file)
        file.write("\n")


@contextmanager
def writing_output(out, overwrite: bool, inputs: Iterable = (), directory: bool = False,
                   written_here: Optional[Callable[[Path], bool]] = None) -> Iterator[None]:
    """check_output under a lock on `out` held until the block ends: of two writers of one output one is refused.
    What a SIGKILLed writer of `out` left behind (temporary files, staging folders) is cleared first."""
    inputs = list(inputs)
    check_output(out, overwrite, inputs, directory, written_here)  # the cheap refusals before any file is made
    with exclusive_writer(out):
        target = Path(out).absolute()
        remove_stale_temporaries(str(target))
        recover_directory(target)
        check_output(out, overwrite, inputs, directory, written_here)  # again: another writer may have finished
        yield
