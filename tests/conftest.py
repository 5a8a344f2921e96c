"""Shared test fixtures: where the corpus is, and a quiet, deterministic torch."""

import os
from pathlib import Path

# The tests run tiny models whose ops are too small to gain from a second thread, and
# subprocesses (CLI runs, DDP ranks) share the cores with this one: one thread each
# avoids OpenMP threads spinning against each other. Set before torch starts OpenMP.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def shared_corpus() -> Path | None:
    candidates = [os.environ.get("PICOGPT_DATA"), SHARED_CORPUS]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")  # session-wide, so module fixtures (pipeline runs) can ask for it too
def corpus_path() -> Path:
    path = shared_corpus()
    if path is None:
        pytest.skip("tiny_shakespeare not found: set PICOGPT_DATA to a local input.txt")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # tests never read or write the user's cache
    monkeypatch.setenv("PICOGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (--dist loadgroup), tests that share a module-scoped fixture stay in one
    worker, so the fixture (a pipeline run, a DDP launch) is built once; the others spread out."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        definitions = fixtures.name2fixturedefs.values() if fixtures else ()
        if any(chain[-1].scope == "module" for chain in definitions if chain):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
