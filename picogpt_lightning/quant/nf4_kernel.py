"""A fused NF4 dequantize-matmul for x86 CPUs with AVX2: the one kernel here written by hand.

Why by hand: no library runs NF4 on this CPU (bitsandbytes' CPU kernel needs AVX-512 BF16, torchao's
NF4 dequantizes then calls F.linear), and inductor's code for the 16-entry codebook lookup runs 10x
slower than fp32's matmul (measured: 10 tokens/s against 98 at 6x384). The kernel reads the packed
codes once per output row, looks each code up with two 8-lane permutes (vpermps) and a blend, and
multiplies by all M activation rows, so a weight costs half a byte of memory traffic instead of four.

Compiled once per machine on the first NF4 matmul on CPU (one line says so; the compiler gets
BUILD_TIMEOUT seconds), with the C++ compiler and torch headers inductor also needs, into a per-user
cache, its hash recorded beside it and checked before every load, as a torch operator (`picogpt::nf4_linear`) registered in C++: torch.compile keeps it in its graph,
and a call costs what an aten operator's does (a Python kernel behind the dispatcher, with ctypes,
measured 6-7 us more a call, over half the kernel's own time at 4x128). Where no compiler or AVX2 is
found, `available()` is False and NF4Linear dequantizes in plain PyTorch; a damaged or foreign library
in the cache is rebuilt (one line), never loaded.
"""

import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch

MAX_ROWS = 16  # more activation rows (prefill, evaluation) go to dequantize + MKL's matmul, faster there

SOURCE = f"#define MAX_ROWS {MAX_ROWS}\n" + r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
/* y[m, n] = sum_k x[m, k] * absmax[(n K + k) / block] * code[q(n K + k)], codes two to a byte, the
   first in the high nibble. xp holds x with each 16-column chunk reordered as its 8 even columns,
   then its 8 odd ones, matching the high and low nibbles of 8 packed bytes. K % 16 == 0 and
   block % 16 == 0, so one chunk lies in one block; M <= MAX_ROWS. */
static inline __m256 lookup(__m256i codes, __m256 low_table, __m256 high_table) {
    /* two 8-entry tables; bit 3 of each code, shifted into the sign bit, picks the second */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, codes), _mm256_permutevar8x32_ps(high_table, codes),
                            _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

static inline void decode_chunk(const uint8_t* bytes, float scale, __m256 low_table, __m256 high_table,
                                __m256* even, __m256* odd) {
    __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)bytes));
    __m256 s = _mm256_set1_ps(scale);
    *even = _mm256_mul_ps(lookup(_mm256_srli_epi32(wide, 4), low_table, high_table), s);
    *odd = _mm256_mul_ps(lookup(_mm256_and_si256(wide, _mm256_set1_epi32(15)), low_table, high_table), s);
}

/* the scale of the next 16-code chunk, its block counted rather than divided out (a division costs more
   than a chunk's decoding); rows are consecutive in the flat weight, so the count runs on across them */
static inline float next_scale(const float* absmax, int64_t* block_index, int64_t* offset, int64_t block) {
    float scale = absmax[*block_index];
    *offset += 16;
    if (*offset == block) { *offset = 0; (*block_index)++; }
    return scale;
}

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* one activation row (batch-1 decoding): four accumulators in registers, two chunks per iteration */
static void nf4_vector(const float* xp, const uint8_t* packed, const float* absmax, __m256 low_table,
                       __m256 high_table, float* y, int64_t N, int64_t K, int64_t block) {
    __m256 even, odd, even2, odd2;
    int64_t block_index = 0, offset = 0;
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = packed + n * K / 2;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            float first_scale = next_scale(absmax, &block_index, &offset, block);
            float second_scale = next_scale(absmax, &block_index, &offset, block);
            decode_chunk(row + k / 2, first_scale, low_table, high_table, &even, &odd);
            decode_chunk(row + k / 2 + 8, second_scale, low_table, high_table, &even2, &odd2);
            a0 = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp + k), a0);
            a1 = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp + k + 8), a1);
            a2 = _mm256_fmadd_ps(even2, _mm256_loadu_ps(xp + k + 16), a2);
            a3 = _mm256_fmadd_ps(odd2, _mm256_loadu_ps(xp + k + 24), a3);
        }
        if (k < K) {
            decode_chunk(row + k / 2, next_scale(absmax, &block_index, &offset, block), low_table, high_table, &even, &odd);
            a0 = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp + k), a0);
            a1 = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp + k + 8), a1);
        }
        y[n] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

static void nf4_linear(const float* x, const uint8_t* packed, const float* absmax, const float* code,
                float* y, int64_t M, int64_t N, int64_t K, int64_t block) {
    float* xp = (float*)malloc(sizeof(float) * M * K);
    for (int64_t i = 0; i < M * K; i++) xp[(i / 16) * 16 + (i % 2) * 8 + (i % 16) / 2] = x[i];
    const __m256 low_table = _mm256_loadu_ps(code), high_table = _mm256_loadu_ps(code + 8);
    __m256 acc[2 * MAX_ROWS], even, odd;
    if (M == 1) {
        nf4_vector(xp, packed, absmax, low_table, high_table, y, N, K, block);
        free(xp);
        return;
    }
    int64_t block_index = 0, offset = 0;
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = packed + n * K / 2;
        /* two accumulators per activation row, so consecutive multiply-adds do not wait on each other */
        for (int64_t m = 0; m < 2 * M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            decode_chunk(row + k / 2, next_scale(absmax, &block_index, &offset, block), low_table, high_table, &even, &odd);
            for (int64_t m = 0; m < M; m++) {
                const float* xm = xp + m * K + k;
                acc[2 * m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xm), acc[2 * m]);
                acc[2 * m + 1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xm + 8), acc[2 * m + 1]);
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = horizontal_sum(_mm256_add_ps(acc[2 * m], acc[2 * m + 1]));
    }
    free(xp);
}

/* the operator: checks what the kernel assumes, converts only what is not already so (no copy in decoding) */
static at::Tensor nf4_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t out_features, int64_t block_size) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) <= MAX_ROWS && x.size(1) % 16 == 0 && block_size % 16 == 0,
                "nf4_linear: x must be (M <= 16, K % 16 == 0) and block_size % 16 == 0");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() * 2 == out_features * x.size(1),
                "nf4_linear: packed must hold out_features * K / 2 bytes");
    TORCH_CHECK(absmax.numel() * block_size >= out_features * x.size(1), "nf4_linear: one absmax per block is needed");
    at::Tensor xf = x.to(at::kFloat).contiguous(), scales = absmax.to(at::kFloat).contiguous();
    at::Tensor table = code.to(at::kFloat).contiguous(), bytes = packed.contiguous();
    at::Tensor out = at::empty({x.size(0), out_features}, xf.options());
    nf4_linear(xf.data_ptr<float>(), bytes.data_ptr<uint8_t>(), scales.data_ptr<float>(), table.data_ptr<float>(),
               out.data_ptr<float>(), x.size(0), out_features, x.size(1), block_size);
    return out;
}

TORCH_LIBRARY(picogpt, m) {
    m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, int out_features, int block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(picogpt, CPU, m) { m.impl("nf4_linear", nf4_linear_op); }
"""


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


BUILD_TIMEOUT = float(os.environ.get("PICOGPT_NF4_BUILD_TIMEOUT", 120))  # seconds the compiler may take, then the slow path


def say(line: str) -> None:
    print(f"nf4 kernel: {line}", file=sys.stderr, flush=True)


def cache_directory() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "picogpt_lightning")


def library_path() -> str:
    digest = hashlib.sha256((SOURCE + torch.__version__).encode()).hexdigest()[:16]  # torch's headers are compiled in
    return os.path.join(cache_directory(), f"nf4_kernel_{digest}.so")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:  # read(), not mapped: a truncated file is a short read, never a SIGBUS
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: str) -> bool:
    """Whether `path` is the library this machine built: its bytes hash to what the build recorded beside it.
    A truncated, foreign or garbage file is not, and is never loaded (loading one can crash the process)."""
    try:
        with open(path + ".sha256") as record:
            return record.read().strip() == file_sha256(path)
    except OSError:
        return False


def build(path: str) -> None:
    """Compiles SOURCE into `path` and records its hash beside it, both renamed into place whole; one process at a
    time (the others wait, then load it). The compiler gets BUILD_TIMEOUT seconds; its folder never outlives it."""
    import fcntl  # POSIX only, and only here: cpu_has_avx2 is False where /proc/cpuinfo is missing

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "nf4_kernel.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if verified(path):  # built by the process that held the lock before
            return
        remove_stale_builds(directory)
        torch_dir = os.path.dirname(torch.__file__)
        with tempfile.TemporaryDirectory(dir=directory, prefix=f"build-{os.getpid()}-") as tmp:
            built = os.path.join(tmp, "nf4.so")
            command = [  # the source comes on standard input (-x c++ -): only the library is written
                os.environ.get("CXX", "g++"), "-O3", "-mavx2", "-mfma", "-std=c++20", "-shared", "-fPIC",
                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-I" + os.path.join(torch_dir, "include"),
                "-x", "c++", "-", "-o", built, "-L" + os.path.join(torch_dir, "lib"), "-lc10", "-ltorch_cpu",
            ]
            compile_within(command, BUILD_TIMEOUT)
            record = os.path.join(tmp, "nf4.so.sha256")
            with open(record, "w") as file:
                file.write(file_sha256(built))
            for name in (built, record):
                with open(name, "rb") as written:
                    os.fsync(written.fileno())  # on disk before the rename, so a crash leaves no empty file
            os.replace(record, path + ".sha256")
            os.replace(built, path)  # atomic: another process sees the whole library or none


def compile_within(command, seconds: float) -> None:
    """Runs the compiler in its own process group, killed whole (cc1plus and as too) past `seconds`."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, errors = process.communicate(SOURCE, timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    except BaseException:  # a signal: the compiler goes with this process
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command[0], stderr=errors)


def remove_stale_builds(directory: str) -> None:
    """Build folders of processes that died mid-build (SIGKILL), named build-<pid>-*."""
    for entry in os.listdir(directory):
        pid = entry.split("-")[1] if entry.startswith("build-") and entry.count("-") >= 2 else ""
        if pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def discard(path: str) -> None:
    for name in (path, path + ".sha256"):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


LOADED = [False]  # the operator is registered in this process (what a compiled graph reads)


@functools.lru_cache(maxsize=1)
def library():
    """The compiled operator's path, built on the first NF4 matmul on CPU and loaded; None when it cannot be.

    A library is loaded only once its bytes match the hash recorded when it was built: a damaged or foreign
    one is rebuilt, saying so in one line, and if it cannot be, NF4 layers dequantize in plain PyTorch."""
    if not cpu_has_avx2():
        return None
    path = library_path()
    compiler = os.environ.get("CXX", "g++")
    try:
        if not verified(path):
            damaged = os.path.exists(path)
            if damaged:
                discard(path)  # never loaded: loading a truncated or foreign library can crash the process
            what = f"{path} does not match the hash recorded at its build (damaged or replaced)" if damaged else None
            if shutil.which(compiler) is None:
                say(f"{what + ' and was removed; ' if what else ''}no C++ compiler ({compiler}) to build the fused "
                    "kernel with: NF4 layers dequantize in plain PyTorch")
                return None
            say(f"{what}: rebuilding it" if what else
                f"compiling the fused AVX2 kernel once for this machine into {path} (at most {BUILD_TIMEOUT:.0f} s)")
            build(path)
        torch.ops.load_library(path)
    except subprocess.TimeoutExpired:
        say(f"the compiler took over {BUILD_TIMEOUT:.0f} s and was stopped; NF4 layers dequantize in plain PyTorch")
        return None
    except subprocess.CalledProcessError as error:
        detail = next((line for line in (error.stderr or "").splitlines() if "error" in line), f"status {error.returncode}")
        say(f"cannot compile ({detail.strip()[:200]}); NF4 layers dequantize in plain PyTorch")
        return None
    except (OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        say(f"cannot build or load {path} ({reason}); NF4 layers dequantize in plain PyTorch")
        return None
    torch.library.register_fake("picogpt::nf4_linear")(nf4_linear_shape)
    LOADED[0] = True
    return path


def built() -> bool:
    """Whether the kernel is loaded already (builds nothing)."""
    return LOADED[0]


def available() -> bool:
    """Whether the fused kernel runs here; the first call builds it (one line on stderr says so)."""
    return library() is not None


def supports(in_features: int, block_size: int) -> bool:
    """Whether the kernel's chunks of 16 codes each fall in one row and one block (a shape question: nothing is built)."""
    return in_features % 16 == 0 and block_size % 16 == 0


def nf4_linear_shape(x, packed, absmax, code, out_features, block_size):
    """What torch.compile traces in the kernel's place: the output's shape and dtype."""
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               out_features: int, block_size: int) -> torch.Tensor:
    """(M, K) x (M <= MAX_ROWS) times the (out_features, K) NF4 weight, transposed, in float32; needs available()."""
    return torch.ops.picogpt.nf4_linear(x, packed, absmax, code, out_features, block_size)
