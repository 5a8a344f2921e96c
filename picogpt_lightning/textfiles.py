"""Reading the text files a user names (data, prompts, corpora, configs): UTF-8, or one line saying where not.

Python's UnicodeDecodeError names a codec and a byte offset, never the file; every text file
the project reads goes through `read_text`, so a Latin-1 or binary file is one line naming the
file, the line and the fix, wherever it is given.
"""

import os
from pathlib import Path
from typing import List, Union

from picogpt_lightning.errors import UserError


def read_text(path, what: str) -> str:
    """The text of `path`, decoded as UTF-8; `what` names the file's role in the error ("corpus", "data file")."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{what} {os.fspath(path)} line {line} is not UTF-8 text ({error.reason}, byte {error.start}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def config_paths(args: List[str]) -> List[str]:
    """The files given with -c/--config on a command line (inline YAML and missing paths are left out)."""
    paths = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    return [path for path in paths if os.path.isfile(path)]


def mentions(word: str, args: Union[List[str], dict]) -> bool:
    """Whether `args` (a command line, or a config as data) or a file it points at (a config, a
    nested class's file) contains `word`: a cheap test before parsing it a second time."""
    args = [repr(args)] if isinstance(args, dict) else list(args)
    for arg in args:
        if word in arg:
            return True
        path = arg.split("=", 1)[-1]
        if os.path.isfile(path):
            try:
                if word.encode() in Path(path).read_bytes():
                    return True
            except OSError:
                return True  # unreadable here: the parse says why
    return False
