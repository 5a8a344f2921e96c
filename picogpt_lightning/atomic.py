"""Writing files so that a failure never leaves a part of one: temp file beside it, fsync, os.replace.

Every file the project writes goes through `write_atomically`, every directory (an export, a token
store) through `write_directory_atomically`; a failed write is one line (`WriteError`) naming the
path, the cause and the fix.
"""

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Callable

from picogpt_lightning.errors import UserError

# safetensors and tokenizers write from Rust and raise their own exception types, naming the OS error inside
OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)|code: (\d+)")


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
        with signals_held():  # a signal here would leave the new file published and its writer reporting failure
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
    return 0o666 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_directory_atomically(directory: str, write: Callable[[str], None]) -> None:
    """`write(staging)` into a temporary directory beside `directory`, fsynced, then renamed into its place.

    The temporary directory shares `directory`'s parent, so every rename stays on one filesystem.
    An existing `directory` is moved aside, the new one renamed in, and only then the old one
    deleted, with SIGTERM, SIGINT and SIGHUP held back meanwhile: a failure at any moment leaves
    the previous directory (or none), never a part of one, and one line naming the path and the
    cause. What a SIGKILL leaves, the next write beside it clears up (recover_directory).
    """
    target = Path(directory).absolute()
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{writer_tag()}.", suffix=".partial", dir=target.parent))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the result from the user's group
        write(str(staging))
        sync_tree(staging)
        with signals_held():
            replace_directory(staging, target)
        staging = None
    except Exception as error:  # noqa: BLE001 - a failed write becomes one line; anything else is re-raised
        cause = os_error(error)
        if cause is None:
            raise
        raise write_error(directory, cause) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def writer_tag() -> str:
    """This writer in a temporary name: its pid and its host, so that a writer on another machine sharing the
    folder (NFS) is never taken for a dead one of this machine."""
    return f"{os.getpid()}-{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}"


def recover_directory(target: Path) -> None:
    """Clears what dead writers of `target` on this machine left: staging directories are removed; a previous
    directory set aside when its writer died is put back if `target` is missing, else removed."""
    host = re.escape(writer_tag().split("-", 1)[1])
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)-{host}\.[^.]+(\.partial|\.old)")
    for entry in sorted(os.listdir(target.parent)):
        match = pattern.fullmatch(entry)
        if not match or process_running(int(match.group(1))):
            continue
        left = target.parent / entry
        if match.group(2) == ".old" and (left / target.name).exists() and not os.path.lexists(target):
            os.rename(left / target.name, target)
        shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def signals_held():
    """SIGTERM, SIGINT and SIGHUP wait until the block is done (where the platform can hold them back)."""
    held = {signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", signal.SIGTERM)}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def replace_directory(new: Path, target: Path) -> None:
    """Renames `new` to `target`; an existing `target` is moved aside first and deleted once `new` is in place."""
    if not os.path.lexists(target):
        os.rename(new, target)
        sync_directory(str(target.parent))
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{writer_tag()}.", suffix=".old", dir=target.parent))
    try:
        os.rename(target, aside / target.name)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(aside / target.name, target)  # the previous export back in its place
            raise
    except OSError:
        aside.rmdir()
        raise
    sync_directory(str(target.parent))
    shutil.rmtree(aside, ignore_errors=True)


def sync_tree(directory: Path) -> None:
    """fsyncs every file under `directory` and the directories themselves, before the rename publishes them."""
    for root, _, names in os.walk(directory):
        for name in names:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        sync_directory(root)


def os_error(error: BaseException):
    """The OSError behind a failed write: in the exception's chain, or named in a Rust library's message."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen and not isinstance(cause, UserError):
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    match = OS_ERROR_IN_MESSAGE.search(str(error)) if not isinstance(error, UserError) else None
    if match:
        number = int(match.group(1) or match.group(2))
        return OSError(number, os.strerror(number))
    return None


class WriterBusy(UserError):
    """Another process is writing the same output right now."""


@contextlib.contextmanager
def exclusive_writer(path):
    """Holds `path` for this process alone while the block writes it: a hidden `.<name>.lock` beside it, created
    with O_EXCL and naming its writer. A second writer is refused in one line instead of both "writing" it and
    one result silently lost; a lock whose writer on this machine is dead (SIGKILLed) is taken over."""
    target = Path(path).absolute()
    lock = target.parent / f".{target.name}.lock"
    created = [parent for parent in reversed([target.parent, *target.parent.parents]) if not parent.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = take_lock(lock, path)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(writer_tag())
    except OSError as error:  # a full disk: the lock goes, and the write is refused in one line
        with contextlib.suppress(OSError):
            os.remove(lock)
        raise write_error(path, error) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)
        if not os.path.lexists(target):  # nothing written: the folders made for it go too, while empty
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    break


def take_lock(lock: Path, path) -> int:
    for _ in range(3):
        try:
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = lock.read_text().strip()
            except FileNotFoundError:
                continue  # its writer just finished
            pid, _, host = owner.partition("-")
            if pid.isdigit() and host == writer_tag().partition("-")[2] and not process_running(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)  # left by a writer that was killed
                continue
            raise WriterBusy(f"{path} is being written by another process ({owner or 'starting'}, lock {lock}); "
                             "wait for it to finish or choose another --out") from None
    raise WriterBusy(f"{path}: could not take its lock {lock}; retry, or choose another --out")
