"""The NF4 kernel's cached library: built on the first matmul, checked against its recorded hash before loading.

Each case runs in a fresh process with its own cache, where a library was planted: truncated, a
foreign shared library, garbage bytes. The process must give correct results and at most one line
about the kernel, never a SIGBUS or a traceback, and leave no build folder.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.quant import nf4_kernel

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, torch, torch.nn.functional as F
from torch import nn
from picogpt_lightning.quant import NF4Linear, nf4_kernel
torch.manual_seed(0)
layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=True))
assert nf4_kernel.library.cache_info().currsize == 0, "built at construction"
x = torch.randn(2, 64)
torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-6)
print("fused" if nf4_kernel.available() else "plain")
"""

needs_avx2 = pytest.mark.skipif(not nf4_kernel.cpu_has_avx2(), reason="the kernel needs an x86 CPU with AVX2")


def run(cache: Path, compiler: str = "g++"):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "CXX": compiler,
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, result.stdout.strip(), lines


def planted(tmp_path: Path, damage: str) -> Path:
    """A cache whose library (with the hash a build records) is then damaged as `damage` says."""
    cache = tmp_path / "cache"
    library = Path(str(nf4_kernel.library_path()).replace(nf4_kernel.cache_directory(), str(cache / "picogpt_lightning")))
    library.parent.mkdir(parents=True)
    some_library = Path(torch.__file__).parent / "lib" / "libtorch_global_deps.so"  # a real ELF shared library
    shutil.copy(some_library, library)
    (library.parent / (library.name + ".sha256")).write_text(nf4_kernel.file_sha256(str(library)))
    if damage == "truncated":
        data = library.read_bytes()
        library.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        shutil.copy(Path(torch.__file__).parent / "lib" / "libshm.so", library)  # another shared library in its place
    elif damage == "garbage":
        library.write_bytes(os.urandom(4096))
    return cache


@needs_avx2
@pytest.mark.parametrize("damage", ["truncated", "foreign", "garbage"])
def test_a_damaged_library_is_never_loaded_and_refused_in_one_line(tmp_path, damage):
    cache = planted(tmp_path, damage)
    status, out, lines = run(cache, compiler=str(tmp_path / "no-such-compiler"))  # it cannot be rebuilt here
    assert status == 0, lines
    assert out == "plain"  # correct results through the plain PyTorch path
    assert len(lines) == 1 and "does not match the hash recorded at its build" in lines[0], lines
    assert "was removed; no C++ compiler" in lines[0] and "plain PyTorch" in lines[0], lines
    assert list((cache / "picogpt_lightning").iterdir()) == []  # removed, and nothing built


@needs_avx2
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler to rebuild with")
def test_a_damaged_library_is_rebuilt_in_one_line_and_then_used(tmp_path):
    cache = planted(tmp_path, "truncated")
    status, out, lines = run(cache)
    assert status == 0, lines
    assert out == "fused" and len(lines) == 1 and "rebuilding it" in lines[0], lines
    directory = cache / "picogpt_lightning"
    library = Path(str(nf4_kernel.library_path()).replace(nf4_kernel.cache_directory(), str(directory)))
    assert nf4_kernel.verified(str(library))
    assert sorted(path.name for path in directory.iterdir()) == sorted(["nf4_kernel.lock", library.name, library.name + ".sha256"])
    status, out, lines = run(cache)  # the next process loads it, silently
    assert (status, out, lines) == (0, "fused", [])


@needs_avx2
def test_a_compiler_that_hangs_is_stopped_in_bounded_time_leaving_no_build_folder(tmp_path):
    compiler = tmp_path / "hanging-compiler"
    compiler.write_text("#!/bin/sh\nsleep 600\n")
    compiler.chmod(0o755)
    env_timeout = {"PICOGPT_NF4_BUILD_TIMEOUT": "2"}
    os.environ.update(env_timeout)
    try:
        status, out, lines = run(tmp_path / "cache", compiler=str(compiler))
    finally:
        del os.environ["PICOGPT_NF4_BUILD_TIMEOUT"]
    assert status == 0 and out == "plain", lines
    assert len(lines) == 2 and lines[0].startswith("nf4 kernel: compiling") and "took over 2 s" in lines[1], lines
    assert sorted(path.name for path in (tmp_path / "cache" / "picogpt_lightning").iterdir()) == ["nf4_kernel.lock"]
