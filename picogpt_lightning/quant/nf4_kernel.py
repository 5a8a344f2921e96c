"""A fused NF4 dequantize-matmul for x86 CPUs with AVX2: the one kernel here written by hand.

Why by hand: no library runs NF4 on this CPU (bitsandbytes' CPU kernel needs AVX-512 BF16, torchao's
NF4 dequantizes then calls F.linear), and inductor's code for the 16-entry codebook lookup runs 10x
slower than fp32's matmul (measured: 10 tokens/s against 98 at 6x384). The kernel reads the packed
codes once per output row, looks each code up with two 8-lane permutes (vpermps) and a blend, and
multiplies by all M activation rows, so a weight costs half a byte of memory traffic instead of four.

Compiled once per machine with the C compiler inductor also needs, into a per-user cache, and called
through ctypes from a torch custom op (`picogpt::nf4_linear`), so torch.compile keeps it in one graph.
Where no compiler or AVX2 is found, `available()` is False and NF4Linear dequantizes in plain PyTorch.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile

import torch

MAX_ROWS = 16  # more activation rows (prefill, evaluation) go to dequantize + MKL's matmul, faster there

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
/* y[m, n] = sum_k x[m, k] * absmax[(n K + k) / block] * code[q(n K + k)], codes two to a byte, the
   first in the high nibble. xp holds x with each 16-column chunk reordered as its 8 even columns,
   then its 8 odd ones, matching the high and low nibbles of 8 packed bytes. K % 16 == 0 and
   block % 16 == 0, so one chunk lies in one block; M <= 16. */
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

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* one activation row (batch-1 decoding): four accumulators in registers, two chunks per iteration */
static void nf4_vector(const float* xp, const uint8_t* packed, const float* absmax, __m256 low_table,
                       __m256 high_table, float* y, int64_t N, int64_t K, int64_t block) {
    __m256 even, odd, even2, odd2;
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = packed + n * K / 2;
        const float* scales = absmax + n * K / block;
        int64_t first = n * K % block;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            decode_chunk(row + k / 2, scales[(first + k) / block], low_table, high_table, &even, &odd);
            decode_chunk(row + k / 2 + 8, scales[(first + k + 16) / block], low_table, high_table, &even2, &odd2);
            a0 = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp + k), a0);
            a1 = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp + k + 8), a1);
            a2 = _mm256_fmadd_ps(even2, _mm256_loadu_ps(xp + k + 16), a2);
            a3 = _mm256_fmadd_ps(odd2, _mm256_loadu_ps(xp + k + 24), a3);
        }
        if (k < K) {
            decode_chunk(row + k / 2, scales[(first + k) / block], low_table, high_table, &even, &odd);
            a0 = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp + k), a0);
            a1 = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp + k + 8), a1);
        }
        y[n] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

void nf4_linear(const float* x, const uint8_t* packed, const float* absmax, const float* code,
                float* y, int64_t M, int64_t N, int64_t K, int64_t block) {
    float* xp = (float*)malloc(sizeof(float) * M * K);
    for (int64_t i = 0; i < M * K; i++) xp[(i / 16) * 16 + (i % 2) * 8 + (i % 16) / 2] = x[i];
    const __m256 low_table = _mm256_loadu_ps(code), high_table = _mm256_loadu_ps(code + 8);
    __m256 acc[2 * 16], even, odd;
    if (M == 1) {
        nf4_vector(xp, packed, absmax, low_table, high_table, y, N, K, block);
        free(xp);
        return;
    }
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = packed + n * K / 2;
        /* two accumulators per activation row, so consecutive multiply-adds do not wait on each other */
        for (int64_t m = 0; m < 2 * M; m++) acc[m] = _mm256_setzero_ps();
        int64_t block_index = n * K / block, offset = n * K % block;  /* one division per row, none per chunk */
        for (int64_t k = 0; k < K; k += 16) {
            decode_chunk(row + k / 2, absmax[block_index], low_table, high_table, &even, &odd);
            offset += 16;
            if (offset == block) { offset = 0; block_index++; }
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
"""


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.lru_cache(maxsize=1)
def library():
    """The compiled kernel, built on first use into ~/.cache (renamed into place whole); None when it cannot be."""
    if not cpu_has_avx2():
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    directory = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "picogpt_lightning")
    path = os.path.join(directory, f"nf4_kernel_{digest}.so")
    try:
        if not os.path.exists(path):
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                source, built = os.path.join(tmp, "nf4.c"), os.path.join(tmp, "nf4.so")
                with open(source, "w") as file:
                    file.write(SOURCE)
                compiler = os.environ.get("CC", "gcc")
                subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", source, "-o", built],
                               check=True, capture_output=True, timeout=120)
                with open(built, "rb") as library_file:
                    os.fsync(library_file.fileno())  # on disk before the rename, so a crash leaves no empty library
                os.replace(built, path)  # atomic: another process sees the whole library or none
        lib = ctypes.CDLL(path)
    except (OSError, subprocess.SubprocessError):
        return None
    lib.nf4_linear.restype = None
    lib.nf4_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
    return lib


def available() -> bool:
    return library() is not None


def supports(in_features: int, block_size: int) -> bool:
    """Whether the kernel's chunks of 16 codes each fall in one row and one block."""
    return in_features % 16 == 0 and block_size % 16 == 0 and available()


def nf4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   out_features: int, block_size: int) -> torch.Tensor:
    """(M, K) float32 x (M <= MAX_ROWS) times the (out_features, K) NF4 weight, transposed."""
    rows, in_features = x.shape
    # each a no-op when already so, as in decoding (model.to(dtype) may have cast the buffers)
    x, absmax, code, packed = x.float().contiguous(), absmax.float().contiguous(), code.float().contiguous(), packed.contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    library().nf4_linear(x.data_ptr(), packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(),
                         rows, out_features, in_features, block_size)
    return out


# a plain operator (Library.define + impl), not torch.library.custom_op: the latter's Python wrapping
# measured 60 us a call, more than the kernel itself at 4x128
OPERATORS = torch.library.Library("picogpt", "DEF")
OPERATORS.define("nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, int out_features, int block_size) -> Tensor")
OPERATORS.impl("nf4_linear", nf4_linear_cpu, "CPU")


@torch.library.register_fake("picogpt::nf4_linear")
def _(x, packed, absmax, code, out_features, block_size):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


nf4_linear = torch.ops.picogpt.nf4_linear
