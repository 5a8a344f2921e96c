"""Finding the corpus: an explicit path, then $PICOGPT_DATA, then the cache, then a checksummed download."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from picogpt_lightning.errors import UserError
from picogpt_lightning.textfiles import read_text

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"

DATA_ENV = "PICOGPT_DATA"  # path of a local corpus file
CACHE_ENV = "PICOGPT_CACHE"  # directory that downloads land in
CACHE_FILE_NAME = "input.txt"
DOWNLOAD_TIMEOUT_S = 30.0


class DataSourceError(UserError, RuntimeError):
    """The corpus could not be found or fetched; the message is one line that says how to fix it.

    Also a RuntimeError, as it always was, so code that catches it that way keeps working.
    """


def default_cache_dir() -> Path:
    """$PICOGPT_CACHE if set, else ~/.cache/picogpt_lightning."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "picogpt_lightning"


def find_corpus(
    data_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    url: str = TINY_SHAKESPEARE_URL,
    md5: str | None = TINY_SHAKESPEARE_MD5,
    download: bool = True,
) -> Path:
    """Return the path of the corpus, downloading it into the cache the first time.

    The first source that is set wins: ``data_path``, then $PICOGPT_DATA, then
    ``cache_dir/input.txt``, then ``url``. A path that is set must exist: falling through to
    another source would silently train on a different file. ``md5=None`` skips the checksum.
    """
    if data_path is not None:
        return _existing_file(data_path, "data_path")
    if os.environ.get(DATA_ENV):
        return _existing_file(os.environ[DATA_ENV], f"${DATA_ENV}")

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache_dir / CACHE_FILE_NAME
    if cached.is_file():
        return cached
    if not download:
        raise DataSourceError(
            f"no corpus at {cached} and download=False; pass data_path=... or set {DATA_ENV} to a local copy"
        )
    _download(url, cached, md5)
    return cached


def read_corpus(data_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """The corpus's text, found as ``find_corpus`` finds it; a file that is not UTF-8 text is a one-line error."""
    path = find_corpus(data_path, cache_dir=cache_dir)
    text = read_text(path, "corpus")
    if "\x00" in text:  # valid UTF-8, but no text: a model would learn one symbol and report loss 0
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"corpus {path} line {line} holds NUL bytes: it is not a text file; point at a text file")
    if len(text) < 2:
        raise UserError(f"corpus {path} holds {len(text)} characters; point at a real text file")
    return text


def _existing_file(path: str | os.PathLike, source: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataSourceError(f"{source} points at {path}, which is not an existing file; fix the path or unset it")
    return path


def _download(url: str, target: Path, md5: str | None) -> None:
    """Fetch ``url`` into ``target`` atomically: a failed or corrupt download leaves no file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in the same directory makes os.replace atomic, so concurrent ranks never read half a file.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(1 << 16):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as err:
                raise _unreachable(url, f"HTTP {err.code} {err.reason}") from err
            except (urllib.error.URLError, OSError, ValueError) as err:  # offline, refused, timed out, bad url
                raise _unreachable(url, getattr(err, "reason", err)) from err
        if md5 is not None and digest.hexdigest() != md5:
            raise DataSourceError(
                f"download from {url} has md5 {digest.hexdigest()}, expected {md5}; it was discarded, "
                "check the url or pass data_path=... to a trusted copy"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _unreachable(url: str, reason: object) -> DataSourceError:
    return DataSourceError(
        f"could not download {url} ({reason}); if offline, pass data_path=... or set {DATA_ENV} to a local copy"
    )
