"""The check every command that writes a file or directory makes before it reads anything."""

from pathlib import Path
from typing import Iterable

from picogpt_lightning.errors import UserError


def check_output(out, overwrite: bool, inputs: Iterable = (), directory: bool = False) -> None:
    """Refuses, in one line, an `out` that already exists (unless `overwrite`) or that would replace an input.

    An output that is one of the command's inputs, or a directory holding one, is refused even
    with `overwrite`: replacing it would destroy what is being read. So is the working directory
    or one above it, which a command replaces by moving it aside. A directory output
    (`directory=True`) may be an existing empty directory.
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
