"""Writing files so that a failure never leaves a part of one: temp file beside it, fsync, os.replace.

Every file the project writes goes through `write_atomically`; a failed write is one line
(`WriteError`) naming the path, the cause and the fix.
"""

import contextlib
import errno
import os
import re
import tempfile

from picogpt_lightning.errors import UserError

class WriteError(UserError):
    """A file that could not be written (disk full, read-only, permissions), named with the cause in one line."""


# what to do about the errors a write meets most; any other names its cause and asks to check the path
WRITE_FIXES = {
    errno.ENOSPC: "free space or choose another directory",
    errno.EDQUOT: "free space within your quota or choose another directory",
    errno.EROFS: "choose a directory on a writable filesystem",
    **dict.fromkeys((errno.EACCES, errno.EPERM), "choose a directory you can write to"),
    errno.EBUSY: "it is in use (a mount point?); choose another path",
}


def write_error(path, error: OSError) -> WriteError:
    fix = WRITE_FIXES.get(error.errno, "check the path and the disk")
    return WriteError(f"cannot write {path}: {error.strerror or error}; {fix}")


def write_atomically(path: str, write) -> None:
    """`write(file)` into a temporary file beside `path`, fsynced, then renamed over it.

    The temporary file lives in the destination's own directory, so the rename never crosses
    a filesystem and is atomic: `path` holds the previous file or the new one, never a part.
    It is hidden and never ends in `.ckpt` (`.last.ckpt.<pid>.<random>.tmp`), so nothing takes it
    for a checkpoint. A write that fails removes it and raises a one-line `WriteError` naming
    `path` and the cause; one a SIGKILL left behind (a killed process cannot clean up) is removed
    by the next write of the same file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp, file = None, None
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(path)
        descriptor, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=directory)
        with os.fdopen(descriptor, "wb") as raw:
            os.fchmod(raw.fileno(), file_mode())  # mkstemp's 0600 would hide the file from the user's group
            file = RecordingWriter(raw)
            write(file)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        tmp = None
        sync_directory(directory)  # the rename itself, on disk
    except OSError as error:
        raise write_error(path, error) from None
    except Exception:
        if file is not None and file.error is not None:  # torch.save reports a failed write as a RuntimeError
            raise write_error(path, file.error) from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


class RecordingWriter:
    """A file whose `write` remembers its OSError, which torch.save turns into a RuntimeError ("unexpected pos")."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def remove_stale_temporaries(path: str) -> None:
    """Removes `path`'s temporary files whose writer (a pid on this machine) is gone: SIGKILLed mid-write."""
    directory, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[^.]+\.tmp")
    for entry in os.listdir(directory):
        match = pattern.fullmatch(entry)
        if match and not process_running(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, entry))


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists (PermissionError: another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sync_directory(directory: str) -> None:
    """fsyncs a directory, so a rename in it survives a power loss; filesystems that cannot are skipped."""
    descriptor = os.open(directory, os.O_RDONLY)
    with contextlib.suppress(OSError):
        os.fsync(descriptor)
    os.close(descriptor)


def file_mode() -> int:
    """The permissions a plain open() would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
