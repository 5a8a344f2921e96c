"""The one error type a user sees: its message is the whole line a command prints."""


class UserError(ValueError):
    """Bad input, named with its fix in one line: a command prints it and exits 1, without a traceback.

    A ValueError, so code that validates with `except ValueError` keeps working; every input
    check of the project raises it (or a subclass), and nothing else is shown as one line.
    """


class InputNotFound(UserError, FileNotFoundError):
    """A file or directory the user named that does not exist."""


def first_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message reduced to its first non-empty line (libraries' messages run to pages)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
