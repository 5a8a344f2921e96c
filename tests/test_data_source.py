"""The corpus source chain: explicit path, $PICOGPT_DATA, cache, checksummed download."""

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest

from picogpt_lightning.data.source import (
    TINY_SHAKESPEARE_MD5,
    DataSourceError,
    default_cache_dir,
    find_corpus,
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("PICOGPT_DATA", raising=False)


@pytest.fixture
def serve(tmp_path):
    """serve(name, content) -> the URL of a file on a local HTTP server."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def publish(name: str, source: Path | bytes) -> str:
        if isinstance(source, bytes):
            (root / name).write_bytes(source)
        else:
            shutil.copyfile(source, root / name)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    yield publish
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"  # nothing listens there any more


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_explicit_path_wins_over_env_and_cache(tmp_path, monkeypatch, closed_port_url):
    explicit = write(tmp_path / "explicit.txt", "explicit")
    monkeypatch.setenv("PICOGPT_DATA", str(write(tmp_path / "env.txt", "env")))
    write(tmp_path / "cache" / "input.txt", "cached")
    assert find_corpus(explicit, cache_dir=tmp_path / "cache", url=closed_port_url) == explicit


def test_env_wins_over_cache(tmp_path, monkeypatch, closed_port_url):
    from_env = write(tmp_path / "env.txt", "env")
    monkeypatch.setenv("PICOGPT_DATA", str(from_env))
    write(tmp_path / "cache" / "input.txt", "cached")
    assert find_corpus(cache_dir=tmp_path / "cache", url=closed_port_url) == from_env


def test_cache_is_used_without_touching_the_network(tmp_path, closed_port_url):
    cached = write(tmp_path / "cache" / "input.txt", "cached")
    assert find_corpus(cache_dir=tmp_path / "cache", url=closed_port_url) == cached


@pytest.mark.parametrize("source", ["argument", "env"])
def test_a_set_path_that_does_not_exist_is_named(tmp_path, monkeypatch, source):
    missing = tmp_path / "nowhere" / "input.txt"
    write(tmp_path / "cache" / "input.txt", "a cache that must not be used instead")
    if source == "env":
        monkeypatch.setenv("PICOGPT_DATA", str(missing))
    with pytest.raises(DataSourceError, match="nowhere") as info:
        find_corpus(missing if source == "argument" else None, cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert ("PICOGPT_DATA" in str(info.value)) == (source == "env")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PICOGPT_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PICOGPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "picogpt_lightning"


def test_download_lands_in_the_cache_with_the_right_md5(tmp_path, serve, corpus_path):
    url = serve("input.txt", corpus_path)
    cache = tmp_path / "cache"
    path = find_corpus(cache_dir=cache, url=url)
    assert path == cache / "input.txt"
    assert hashlib.md5(path.read_bytes()).hexdigest() == TINY_SHAKESPEARE_MD5
    assert len(path.read_text()) == 1_115_394
    assert [p.name for p in cache.iterdir()] == ["input.txt"]  # no temp file left behind


def test_download_goes_to_default_cache_dir(tmp_path, monkeypatch, serve):
    monkeypatch.setenv("PICOGPT_CACHE", str(tmp_path / "env-cache"))
    url = serve("input.txt", b"some other corpus\n")
    path = find_corpus(url=url, md5=None)
    assert path == tmp_path / "env-cache" / "input.txt"
    assert path.read_bytes() == b"some other corpus\n"


def test_md5_mismatch_is_refused_and_leaves_nothing(tmp_path, serve):
    url = serve("input.txt", b"not shakespeare\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError, match="md5") as info:
        find_corpus(cache_dir=cache, url=url)
    assert "\n" not in str(info.value)
    assert list(cache.iterdir()) == []
    # md5=None is how other corpora opt out of the check
    assert find_corpus(cache_dir=cache, url=url, md5=None).read_bytes() == b"not shakespeare\n"


def test_unreachable_url_says_how_to_use_a_local_copy(tmp_path, closed_port_url):
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError) as info:
        find_corpus(cache_dir=cache, url=closed_port_url)
    message = str(info.value)
    assert "\n" not in message
    assert closed_port_url in message and "data_path" in message and "PICOGPT_DATA" in message
    assert list(cache.iterdir()) == []


def test_http_error_is_a_data_source_error(tmp_path, serve):
    missing_url = serve("present.txt", b"x").replace("present.txt", "absent.txt")
    with pytest.raises(DataSourceError, match="404"):
        find_corpus(cache_dir=tmp_path / "cache", url=missing_url)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_false_does_not_fetch(tmp_path, serve):
    url = serve("input.txt", b"text")
    with pytest.raises(DataSourceError, match="download=False"):
        find_corpus(cache_dir=tmp_path / "cache", url=url, download=False)
    assert not (tmp_path / "cache" / "input.txt").exists()
