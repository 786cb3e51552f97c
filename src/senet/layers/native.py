"""Native CPU kernels: a residual unit's whole end in eager inference in one call; the SE block alone in one call
forward and one backward, in training too (``se_scale_train``); max pooling (``max_pool2d``, ``senet.layers.pool``).

With PyTorch's ops as the unit of work, an SE-ResNet unit ends (in inference) in ``x = bn(c)``, a squeeze
``mean_hw x``, six small excitation calls and ``relu(x * s + shortcut)``: ten calls and four passes over
the activation. Eval-mode BN is affine per channel (``bn(c) = α c + β``), so the whole end is

    z = α mean_hw c + β,   s = σ(W2 relu(W1 z + b1) + b2),   y = relu(c (α s) + β s + shortcut)

one read of ``c`` for the squeeze and one pass that reads ``c`` and ``shortcut`` and writes ``y``. The
plain unit's end ``relu(bn(c) + shortcut)`` is the same pass without the scale (torchvision: three passes,
``bn``, ``+= identity``, ``relu``). Inside the unit, ``relu(bn(c))`` after the first two convs is one pass too
(``bn_relu``; PyTorch: two), which before the last 1x1 conv also gives ``mean_hw`` of its output, so that the
SE end's squeeze reads only that conv's weight (``mean_hw conv(h) = W mean_hw h + b``). All are C functions
here (``SOURCE``), built with the machine's C
compiler on first use, cached under ``~/.cache/senet/native`` (or ``$SENET_CACHE_DIR``) and called through
ctypes. Where torch runs on GNU OpenMP (Linux wheels) the kernels are built with OpenMP and share torch's
runtime and thread count; elsewhere they are single-threaded and used only while torch runs one thread.

Used only where nothing can tell the difference: eager inference (no autograd) on the CPU, float32
contiguous NCHW tensors, BN with running statistics, the plain SE block (``SqueezeExcite`` with Linear FCs,
ReLU, sigmoid, average pooling) and a ReLU after the addition, nobody hooking any of them, no autocast,
the fast path enabled (``fused.reference_path()`` turns these off too). In training (autograd) only the
plain SE block used on its own (``_SEScale``: its backward too), under the same conditions but BN's.
Everything else takes PyTorch's ops.
Without a C compiler (or with ``SENET_NATIVE=0``) senet runs PyTorch's ops everywhere: same results up to
float rounding, slower at small batches. ``status()`` says which, and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .fused import _first_order_only, plain_pointwise_conv

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Parallel regions share torch's GNU OpenMP runtime when built with -fopenmp (nt: torch's thread count);
   without it the pragmas other than simd are ignored and everything runs on the calling thread. */

/* alpha, beta of eval-mode BN per channel: bn(c) = alpha c + beta (w, b may be NULL: no affine) */
static void bn_affine(const float *rm, const float *rv, const float *w, const float *b, float eps, long C,
                      float *alpha, float *beta) {
    for (long ch = 0; ch < C; ++ch) {
        float a = (w ? w[ch] : 1.0f) / sqrtf(rv[ch] + eps);
        alpha[ch] = a;
        beta[ch] = (b ? b[ch] : 0.0f) - rm[ch] * a;
    }
}

/* z[p] = mean of plane p of x (B C planes of HW floats), through alpha, beta when given */
static void squeeze(const float *x, float *z, const float *alpha, const float *beta, long B, long C, long HW) {
    float inv_hw = 1.0f / (float)HW;
    #pragma omp for schedule(static)
    for (long p = 0; p < B * C; ++p) {
        const float *xp = x + p * HW;
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (long i = 0; i < HW; ++i) s += xp[i];
        s *= inv_hw;
        z[p] = alpha ? alpha[p % C] * s + beta[p % C] : s;
    }
}

/* Vectors of VW floats (GCC/Clang vector extensions): the widest the target has (-march=native); loads and
   stores through memcpy (unaligned, no aliasing assumptions). */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf a) { float s = 0.0f; for (int i = 0; i < VW; ++i) s += a[i]; return s; }

/* out[b * ld + a] = W[a] . v[b] (rows of k floats) for NJ rows of W and NN vectors v: NJ x NN vector
   accumulators, each row and vector read once per block */
#define DOT_BLOCK(NJ, NN)                                                                            \
static void dot_##NJ##x##NN(const float *W, const float *v, float *out, long k, long ld) {            \
    vf acc[NJ][NN];                                                                                  \
    for (int a = 0; a < NJ; ++a) for (int b = 0; b < NN; ++b) acc[a][b] = (vf){0};                   \
    long i = 0;                                                                                      \
    for (; i + VW <= k; i += VW) {                                                                   \
        vf w[NJ], x[NN];                                                                             \
        for (int a = 0; a < NJ; ++a) w[a] = vload(W + a * k + i);                                    \
        for (int b = 0; b < NN; ++b) x[b] = vload(v + b * k + i);                                    \
        for (int a = 0; a < NJ; ++a) for (int b = 0; b < NN; ++b) acc[a][b] += w[a] * x[b];          \
    }                                                                                                \
    for (int a = 0; a < NJ; ++a) for (int b = 0; b < NN; ++b) {                                      \
        float s = hsum(acc[a][b]);                                                                   \
        for (long t = i; t < k; ++t) s += W[a * k + t] * v[b * k + t];                              \
        out[b * ld + a] = s;                                                                         \
    }                                                                                                \
}
DOT_BLOCK(4, 4)
DOT_BLOCK(4, 1)
DOT_BLOCK(1, 4)
DOT_BLOCK(1, 1)

/* Two vectors' lanes as one: SHUF(a, b, i...) picks lane i of a (i < VW) or lane i - VW of b per result lane */
#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif
/* FOLD(a, b, h): a and b hold rows of 2h lanes each (VW / 2h rows per vector); the result holds the same rows
   in the same order, a's then b's, each folded to h lanes (lane l plus lane l + h) */
#define FL(h, l) (((l) / (h)) * 2 * (h) + ((l) % (h)))
#if VW == 16
#define LANES(h, o) FL(h, 0) + o, FL(h, 1) + o, FL(h, 2) + o, FL(h, 3) + o, FL(h, 4) + o, FL(h, 5) + o,          \
    FL(h, 6) + o, FL(h, 7) + o, FL(h, 8) + o, FL(h, 9) + o, FL(h, 10) + o, FL(h, 11) + o, FL(h, 12) + o,        \
    FL(h, 13) + o, FL(h, 14) + o, FL(h, 15) + o
#elif VW == 8
#define LANES(h, o) FL(h, 0) + o, FL(h, 1) + o, FL(h, 2) + o, FL(h, 3) + o, FL(h, 4) + o, FL(h, 5) + o,          \
    FL(h, 6) + o, FL(h, 7) + o
#else
#define LANES(h, o) FL(h, 0) + o, FL(h, 1) + o, FL(h, 2) + o, FL(h, 3) + o
#endif
#define FOLD(a, b, h) (SHUF(a, b, LANES(h, 0)) + SHUF(a, b, LANES(h, h)))

/* Lane a of the result: the sum of a[a]'s lanes, for VW vectors a (overwritten), in log2 VW rounds of FOLD
   (VW - 1 folds in all, where VW horizontal sums take VW (VW - 1) scalar additions) */
static inline vf row_sums(vf *a) {
    int n = VW;
#if VW >= 16
    for (int m = 0; m < n / 2; ++m) a[m] = FOLD(a[2 * m], a[2 * m + 1], 8);
    n /= 2;
#endif
#if VW >= 8
    for (int m = 0; m < n / 2; ++m) a[m] = FOLD(a[2 * m], a[2 * m + 1], 4);
    n /= 2;
#endif
    for (int m = 0; m < n / 2; ++m) a[m] = FOLD(a[2 * m], a[2 * m + 1], 2);
    return FOLD(a[0], a[1], 1);
}

/* out[a] = W[a] . v for VW rows of W (rows of k floats) and one vector v: one accumulator per row, summed
   across lanes all together (row_sums). Against dot_4x1, whose horizontal sums cost as much as the products
   where rows are short (one thread, batch 1, weights out of cache, ResNet-50's FCs, scratch, medians of 21
   interleaved rounds): the second FC (rows of C/16) 0.60-0.76x the time at C = 256..2048, the first
   0.80-0.97x; se_resnet50's 16 unit ends ~0.1 ms less a forward (30 rounds, timed in place).
   Rows of up to IN_ORDER_K floats are read one after the other, so that the VW rows' VW k floats (one
   contiguous run) stream in address order; longer rows side by side, one vector of each in turn (v read once).
   Side by side, short rows are VW streams a few lines long, which the prefetchers do not follow: on an AMD
   EPYC (scratch C harness, one thread, medians of 300 interleaved calls of the whole excitation at batch 1)
   in order took 0.49-0.69x the time with the weights in memory and 0.83x from L3 at C = 512..2048. */
#define IN_ORDER_K 512
static void dot_vw_x1(const float *W, const float *v, float *out, long k) {
    vf acc[VW];
    long i = k / VW * VW;
    if (k <= IN_ORDER_K) {
        for (int a = 0; a < VW; ++a) {
            const float *w = W + a * k;
            vf s0 = (vf){0}, s1 = (vf){0};  /* two chains: one would wait on its own additions */
            long t = 0;
            for (; t + 2 * VW <= i; t += 2 * VW) {
                s0 += vload(w + t) * vload(v + t);
                s1 += vload(w + t + VW) * vload(v + t + VW);
            }
            if (t < i) s0 += vload(w + t) * vload(v + t);
            acc[a] = s0 + s1;
        }
    } else {
        for (int a = 0; a < VW; ++a) acc[a] = (vf){0};
        for (long t = 0; t < i; t += VW) {
            vf x = vload(v + t);
            for (int a = 0; a < VW; ++a) acc[a] += vload(W + a * k + t) * x;
        }
    }
    vf s = row_sums(acc);
    for (int a = 0; a < VW; ++a)
        for (long t = i; t < k; ++t) s[a] += W[a * k + t] * v[t];
    vstore(out, s);
}

/* out[n * ld + j] = W[j] . v[n] for rows j0 <= j < j1 of W (rows of k floats) and each of the B vectors v[n]
   (k floats apart), in blocks of four rows by four vectors, and VW rows by one vector for the last B % 4 */
static void rows_dot(const float *W, const float *v, float *out, long j0, long j1, long k, long B, long ld) {
    long n = 0;
    for (; n + 4 <= B; n += 4) {
        long j = j0;
        for (; j + 4 <= j1; j += 4) dot_4x4(W + j * k, v + n * k, out + n * ld + j, k, ld);
        for (; j < j1; ++j) dot_1x4(W + j * k, v + n * k, out + n * ld + j, k, ld);
    }
    for (; n < B; ++n) {
        long j = j0;
        for (; j + VW <= j1; j += VW) dot_vw_x1(W + j * k, v + n * k, out + n * ld + j, k);
        for (; j + 4 <= j1; j += 4) dot_4x1(W + j * k, v + n * k, out + n * ld + j, k, ld);
        for (; j < j1; ++j) dot_1x1(W + j * k, v + n * k, out + n * ld + j, k, ld);
    }
}

/* rows_dot for short rows (k <= SHORT_K, the second FC's C/r): VW rows of W at a time, transposed into a
   k x VW block, so each product is VW outputs at once and no horizontal sums are needed */
#define SHORT_K 512
static void rows_dot_short(const float *W, const float *v, float *out, long j0, long j1, long k, long B, long ld) {
    float T[SHORT_K * VW];
    long j = j0;
    for (; j + VW <= j1; j += VW) {
        for (long i = 0; i < k; ++i)
            for (int l = 0; l < VW; ++l) T[i * VW + l] = W[(j + l) * k + i];
        long n = 0;
        for (; n + 4 <= B; n += 4) {
            const float *v0 = v + n * k, *v1 = v0 + k, *v2 = v1 + k, *v3 = v2 + k;
            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (long i = 0; i < k; ++i) {
                vf t = vload(T + i * VW);
                a0 += t * v0[i]; a1 += t * v1[i]; a2 += t * v2[i]; a3 += t * v3[i];
            }
            vstore(out + n * ld + j, a0); vstore(out + (n + 1) * ld + j, a1);
            vstore(out + (n + 2) * ld + j, a2); vstore(out + (n + 3) * ld + j, a3);
        }
        for (; n < B; ++n) {
            const float *v0 = v + n * k;
            vf a0 = {0}, a1 = {0};  /* two chains: one would wait on its own additions */
            long i = 0;
            for (; i + 2 <= k; i += 2) { a0 += vload(T + i * VW) * v0[i]; a1 += vload(T + (i + 1) * VW) * v0[i + 1]; }
            if (i < k) a0 += vload(T + i * VW) * v0[i];
            vstore(out + n * ld + j, a0 + a1);
        }
    }
    if (j < j1) rows_dot(W, v, out, j, j1, k, B, ld);
}

/* out[i * ldo + l] = sum_t a[i * sai + t * sat] M[t * ldm + l] for rows i0 <= i < i1 and l < L: rows of M
   scaled and summed (the products whose long side is contiguous in M), four rows of out at a time */
static void axpy_rows(const float *a, long sai, long sat, long T, const float *M, long ldm, float *out, long ldo,
                      long i0, long i1, long L) {
    for (long i = i0; i < i1; i += 4) {
        const float *ar[4];
        for (int r = 0; r < 4; ++r) ar[r] = a + (i + r < i1 ? i + r : i1 - 1) * sai;  /* past i1: not stored */
        long l = 0;
        for (; l + 2 * VW <= L; l += 2 * VW) {
            vf p[4][2];
            for (int r = 0; r < 4; ++r) p[r][0] = p[r][1] = (vf){0};
            for (long t = 0; t < T; ++t) {
                vf m0 = vload(M + t * ldm + l), m1 = vload(M + t * ldm + l + VW);
                for (int r = 0; r < 4; ++r) { float x = ar[r][t * sat]; p[r][0] += m0 * x; p[r][1] += m1 * x; }
            }
            for (int r = 0; r < 4 && i + r < i1; ++r) {
                vstore(out + (i + r) * ldo + l, p[r][0]); vstore(out + (i + r) * ldo + l + VW, p[r][1]);
            }
        }
        for (; l < L; ++l) {
            float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (long t = 0; t < T; ++t)
                for (int r = 0; r < 4; ++r) q[r] += ar[r][t * sat] * M[t * ldm + l];
            for (int r = 0; r < 4 && i + r < i1; ++r) out[(i + r) * ldo + l] = q[r];
        }
    }
}

/* this thread's share [*lo, *hi) of n rows, in blocks of blk */
static void share(long n, long blk, long *lo, long *hi) {
#ifdef _OPENMP
    long t = omp_get_thread_num(), nt = omp_get_num_threads(), blocks = (n + blk - 1) / blk;
    long per = blocks / nt, extra = blocks % nt;
    long b0 = t * per + (t < extra ? t : extra), b1 = b0 + per + (t < extra ? 1 : 0);
    *lo = b0 * blk < n ? b0 * blk : n;
    *hi = b1 * blk < n ? b1 * blk : n;
#else
    (void)blk;
    *lo = 0;
    *hi = n;
#endif
}

/* e^x, vectorisable (libm's expf is not, without -ffast-math): x = n ln2 + r, |r| <= ln2 / 2, e^r by
   Cephes' degree-7 polynomial (relative error ~1e-7), 2^n through the exponent bits; x clamped to
   [-87, 88], where e^x stays a normal float */
static inline float exp_vec(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* x - n ln2, ln2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* Outputs of 4 to 32 MB (twice this machine's 2 MB L2 and up) are written with streaming (non-temporal) stores
   where the target has them: that large they leave the caches anyway, and a plain store first reads each line
   it writes (one more pass over memory; memcpy streams too). glibc hands out larger blocks as fresh pages, which
   the kernel zeroes on the first store: a plain store then finds the line in cache, and streaming was slower.
   Measured (one thread, batch 16, ResNet-50's SE sizes, interleaved A/B): 0.63-0.70x the time at 12.8 and
   25.7 MB, 1.22x at 51 MB; at 6.4 MB (2048 x 7 x 7) the block's forward 0.52x once planes of 49 floats could
   be streamed too (planes_affine). */
#define STREAM_MIN_BYTES (4L << 20)
#define STREAM_MAX_BYTES (32L << 20)
#define STREAMED(bytes) ((bytes) >= STREAM_MIN_BYTES && (bytes) < STREAM_MAX_BYTES)
#if defined(__SSE__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_STREAM 1
#else
#define HAVE_STREAM 0
#endif

/* out[i] = in[i] * a + d for i < n; streamed when asked and out is 16-byte aligned (call stream_fence() after) */
static inline void plane_affine(const float *in, float *out, long n, float a, float d, int stream) {
#if HAVE_STREAM
    if (stream && ((uintptr_t)out & 15) == 0) {
        __m128 va = _mm_set1_ps(a), vd = _mm_set1_ps(d);
        long i = 0;
        for (; i + 4 <= n; i += 4) _mm_stream_ps(out + i, _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(in + i), va), vd));
        for (; i < n; ++i) out[i] = in[i] * a + d;
        return;
    }
#else
    (void)stream;
#endif
    #pragma omp simd
    for (long i = 0; i < n; ++i) out[i] = in[i] * a + d;
}

static inline void stream_fence(void) {
#if HAVE_STREAM
    _mm_sfence();
#endif
}

/* h = relu(W1 z + b1) (B x R), s = sigmoid(W2 h + b2) (B x C). W1: R x C, W2: C x R, row-major.
   Called by every thread of a team (or one): each computes its share of rows, then waits for the rest. */
static void excite(const float *z, float *h, float *s, const float *w1, const float *b1, const float *w2,
                   const float *b2, long B, long C, long R) {
    long lo, hi;
    share(R, 4, &lo, &hi);
    rows_dot(w1, z, h, lo, hi, C, B, R);
    for (long n = 0; n < B; ++n) {
        float *hn = h + n * R;
        for (long r = lo; r < hi; ++r) {
            float a = hn[r] + (b1 ? b1[r] : 0.0f);
            hn[r] = a > 0.0f ? a : 0.0f;
        }
    }
    #pragma omp barrier
    share(C, VW, &lo, &hi);
    if (R <= SHORT_K && B >= 2) rows_dot_short(w2, h, s, lo, hi, R, B, C);  /* the transposition pays from 2 */
    else rows_dot(w2, h, s, lo, hi, R, B, C);
    for (long n = 0; n < B; ++n) {
        float *sn = s + n * C;
        #pragma omp simd
        for (long ch = lo; ch < hi; ++ch) sn[ch] = 1.0f / (1.0f + exp_vec(-(sn[ch] + (b2 ? b2[ch] : 0.0f))));
    }
    #pragma omp barrier
}

/* y = relu(c k + m + sc) with k, m per plane (k[p % kc], m[p % kc]: per channel when kc = C) */
static void affine_add_relu(const float *c, const float *sc, float *y, const float *k, const float *m,
                            long planes, long kc, long HW) {
    #pragma omp for schedule(static)
    for (long p = 0; p < planes; ++p) {
        float a = k[p % kc], d = m[p % kc];
        const float *cp = c + p * HW, *sp = sc + p * HW;
        float *yp = y + p * HW;
        #pragma omp simd
        for (long i = 0; i < HW; ++i) { float v = cp[i] * a + d + sp[i]; yp[i] = v > 0.0f ? v : 0.0f; }
    }
}

/* out = in k[p] + m[p] (m may be NULL: 0) over P planes of HW floats, shared among the team; streamed when
   asked (then fenced). A streaming store must write a whole aligned vector, and planes of 7x7 or 14x14 floats
   do not start on one: those (HW below FLAT_MAX_HW, not a multiple of 16) are written with AVX-512 as one flat
   run of aligned vectors. G = 16 / gcd(HW, 16) planes make a period of G HW / 16 vectors, and each lane's k
   and m are picked (vpermps) from the vector of the period's G factors by a table of lane -> plane. (Without
   streaming the flat run was no faster than plane by plane.) */
#define FLAT_MAX_HW 256
static void planes_affine(const float *in, float *out, const float *k, const float *m, long P, long HW, int stream) {
    long p0 = 0;
#if defined(__AVX512F__)
    if (stream && HW % 16 != 0 && HW < FLAT_MAX_HW && ((uintptr_t)out & 63) == 0) {
        long low = HW & -HW, G = 16 / (low < 16 ? low : 16), V = G * HW / 16, periods = P / G;
        int tab[16 * FLAT_MAX_HW];
        for (long i = 0; i < 16 * V; ++i) tab[i] = (int)(i / HW);
        __mmask16 lanes = (__mmask16)((1u << G) - 1u);
        #pragma omp for schedule(static)
        for (long q = 0; q < periods; ++q) {
            __m512 kv = _mm512_maskz_loadu_ps(lanes, k + q * G);
            __m512 mv = m ? _mm512_maskz_loadu_ps(lanes, m + q * G) : _mm512_setzero_ps();
            const float *ip = in + q * G * HW;
            float *op = out + q * G * HW;
            for (long v = 0; v < V; ++v) {
                __m512i ix = _mm512_loadu_si512(tab + 16 * v);
                _mm512_stream_ps(op + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(ip + 16 * v),
                                                              _mm512_permutexvar_ps(ix, kv),
                                                              _mm512_permutexvar_ps(ix, mv)));
            }
        }
        p0 = periods * G;
    }
#endif
    #pragma omp for schedule(static)
    for (long p = p0; p < P; ++p) plane_affine(in + p * HW, out + p * HW, HW, k[p], m ? m[p] : 0.0f, stream);
    if (stream) stream_fence();
}

/* y = relu(bn(c) + sc); y may be c or sc. tmp: 2 C floats. */
void senet_bn_add_relu(const float *c, const float *sc, float *y, const float *rm, const float *rv,
                       const float *w, const float *b, float eps, long B, long C, long HW, float *tmp, int nt) {
    float *alpha = tmp, *beta = tmp + C;
    bn_affine(rm, rv, w, b, eps, C, alpha, beta);
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    affine_add_relu(c, sc, y, alpha, beta, B * C, C, HW);
}

/* y = relu(bn(c)) over B C planes of HW floats; y may be c. hmean (NULL: not wanted): mean_hw y per plane, from
   the same pass (an SE unit end's squeeze through the next 1x1 conv reads these instead of y). tmp: 2 C floats. */
void senet_bn_relu(const float *c, float *y, const float *rm, const float *rv, const float *w, const float *b,
                   float eps, long B, long C, long HW, float *hmean, float *tmp, int nt) {
    float *alpha = tmp, *beta = tmp + C;
    float inv_hw = 1.0f / (float)HW;
    bn_affine(rm, rv, w, b, eps, C, alpha, beta);
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && B * C * HW > 32768)
    for (long p = 0; p < B * C; ++p) {
        float a = alpha[p % C], d = beta[p % C], s = 0.0f;
        const float *cp = c + p * HW;
        float *yp = y + p * HW;
        #pragma omp simd reduction(+:s)
        for (long i = 0; i < HW; ++i) {
            float v = cp[i] * a + d;
            v = v > 0.0f ? v : 0.0f;
            yp[i] = v;
            s += v;
        }
        if (hmean) hmean[p] = s * inv_hw;
    }
}

/* y = relu(bn(c) s + sc), s = sigmoid(W2 relu(W1 mean_hw bn(c) + b1) + b2); y may be c or sc.
   hin, w3, b3: c = conv(hin), a 1x1 conv (stride 1, one group) with weight w3 (C x Ch) and bias b3 (NULL:
   none) on hin (B x Ch x HW); then mean_hw c = w3 mean_hw hin + b3, and the squeeze reads hin and w3 instead
   of c (a quarter of c in a ResNet bottleneck); hmean (NULL: not known): mean_hw hin (B x Ch), when the pass
   that wrote hin computed it (senet_bn_relu): then only w3 is read. hin and hmean NULL: the squeeze reads c.
   tmp: 3 B C + B R + 2 C + B Ch floats (Ch = 0 without hin); on return its first B C floats are s. */
void senet_se_unit_end(const float *c, const float *sc, float *y, const float *rm, const float *rv,
                       const float *bw, const float *bb, float eps, const float *w1, const float *b1,
                       const float *w2, const float *b2, long B, long C, long R, long HW, const float *hin,
                       const float *w3, const float *b3, long Ch, const float *hmean, float *tmp, int nt) {
    float *s = tmp, *k = s + B * C, *m = k + B * C, *h = m + B * C, *alpha = h + B * R, *beta = alpha + C;
    float *mh = beta + C;
    const float *mhin = hmean ? hmean : mh;  /* mean_hw hin */
    bn_affine(rm, rv, bw, bb, eps, C, alpha, beta);
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    {
        if (hin || hmean) {
            long lo, hi;
            if (!hmean) squeeze(hin, mh, 0, 0, B, Ch, HW);  /* ends with a barrier: mh complete */
            share(C, VW, &lo, &hi);  /* k = mean_hw c, this thread's channels */
            if (Ch <= SHORT_K && B >= 2) rows_dot_short(w3, mhin, k, lo, hi, Ch, B, C);
            else rows_dot(w3, mhin, k, lo, hi, Ch, B, C);
            for (long n = 0; n < B; ++n)
                for (long ch = lo; ch < hi; ++ch)
                    k[n * C + ch] = alpha[ch] * (k[n * C + ch] + (b3 ? b3[ch] : 0.0f)) + beta[ch];
            #pragma omp barrier
        } else {
            squeeze(c, k, alpha, beta, B, C, HW);  /* z into k: k is written only after the excitation */
        }
        excite(k, h, s, w1, b1, w2, b2, B, C, R);
        #pragma omp for schedule(static)
        for (long p = 0; p < B * C; ++p) {
            k[p] = alpha[p % C] * s[p];
            m[p] = beta[p % C] * s[p];
        }
        affine_add_relu(c, sc, y, k, m, B * C, B * C, HW);
    }
}

/* y = x s, s = sigmoid(W2 relu(W1 mean_hw x + b1) + b2): the SE block alone; y may be x.
   work: 2 B C + B R floats; on return z = mean_hw x, h = relu(W1 z + b1) and s, one after the other (what
   the backward needs). */
void senet_se_scale(const float *x, float *y, const float *w1, const float *b1, const float *w2,
                    const float *b2, long B, long C, long R, long HW, float *work, int nt) {
    float *z = work, *h = z + B * C, *s = h + B * R;
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    {
        squeeze(x, z, 0, 0, B, C, HW);
        excite(z, h, s, w1, b1, w2, b2, B, C, R);
        int stream = y != x && STREAMED(B * C * HW * 4);
        planes_affine(x, y, s, 0, B * C, HW, stream);
    }
}

/* rows i0 <= i < i1 of axpy_rows, split into blocks of four among the team (or all on one thread) */
static void axpy_rows_shared(const float *a, long sai, long sat, long T, const float *M, long ldm, float *out,
                             long ldo, long I, long L) {
    #pragma omp for schedule(static)
    for (long blk = 0; blk < (I + 3) / 4; ++blk) {
        long i1 = blk * 4 + 4 < I ? blk * 4 + 4 : I;
        axpy_rows(a, sai, sat, T, M, ldm, out, ldo, blk * 4, i1, L);
    }
}

/* out[j] = sum_n a[n * J + j] for j < J (a bias's gradient), the columns shared among the team */
static void column_sums(const float *a, long B, long J, float *out) {
    #pragma omp for schedule(static)
    for (long j = 0; j < J; ++j) {
        float t = 0.0f;
        for (long n = 0; n < B; ++n) t += a[n * J + j];
        out[j] = t;
    }
}

/* Backward of y = x s, s = sigmoid(W2 relu(W1 z + b1) + b2), z = mean_hw x (senet_se_scale's z, h, s),
   given g = dL/dy:
     da = (sum_hw g x) s (1 - s)             (B x C: the sigmoid's input)
     dW2 = da^T h, db2 = sum_n da, dh = (da W2) [h > 0], dW1 = dh^T z, db1 = sum_n dh, dz = dh W1
     dx = g s + dz / HW
   Any of dx, dw1, db1, dw2, db2 may be NULL (not wanted). tmp: 2 B C + B R floats. */
void senet_se_scale_backward(const float *g, const float *x, const float *z, const float *h, const float *s,
                             const float *w1, const float *w2, float *dx, float *dw1, float *db1, float *dw2,
                             float *db2, long B, long C, long R, long HW, float *tmp, int nt) {
    float *da = tmp, *dz = da + B * C, *dh = dz + B * C;
    float inv_hw = 1.0f / (float)HW;
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    {
        #pragma omp for schedule(static)
        for (long p = 0; p < B * C; ++p) {
            const float *gp = g + p * HW, *xp = x + p * HW;
            float d = 0.0f;
            #pragma omp simd reduction(+:d)
            for (long i = 0; i < HW; ++i) d += gp[i] * xp[i];
            da[p] = d * s[p] * (1.0f - s[p]);
        }
        if (dw2) axpy_rows_shared(da, 1, C, B, h, R, dw2, R, C, R);  /* dW2[c, j] = sum_n da[n, c] h[n, j] */
        if (db2) column_sums(da, B, C, db2);
        axpy_rows_shared(da, C, 1, C, w2, R, dh, R, B, R);  /* dh[n, j] = sum_c da[n, c] W2[c, j] */
        #pragma omp for schedule(static)
        for (long q = 0; q < B * R; ++q) dh[q] = h[q] > 0.0f ? dh[q] : 0.0f;
        if (dw1) axpy_rows_shared(dh, 1, R, B, z, C, dw1, C, R, C);  /* dW1[j, k] = sum_n dh[n, j] z[n, k] */
        if (db1) column_sums(dh, B, R, db1);
        if (dx) {
            axpy_rows_shared(dh, R, 1, R, w1, C, dz, C, B, C);  /* dz[n, k] = sum_j dh[n, j] W1[j, k] */
            int stream = STREAMED(B * C * HW * 4);
            #pragma omp for schedule(static)
            for (long p = 0; p < B * C; ++p) dz[p] *= inv_hw;  /* the squeeze's gradient per element */
            planes_affine(g, dx, s, dz, B * C, HW, stream);
        }
    }
}

/* a, or b where b is larger or NaN: scanning a window in order with this keeps the first maximum, NaN
   winning (as PyTorch's CPU max pooling) */
static inline float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

/* [lo, hi): the output columns whose pooling window (kw wide, stride sw, from -pw) lies inside a row of W */
static void interior_columns(long W, long OW, long kw, long sw, long pw, long *lo, long *hi) {
    *hi = W - kw + pw >= 0 ? (W - kw + pw) / sw + 1 : 0;
    if (*hi > OW) *hi = OW;
    *lo = (pw + sw - 1) / sw;
    if (*lo > *hi) *lo = *hi;
}

/* yr[ow] = the maximum of row (W floats) over each output column's window: columns ow * sw - pw + dw,
   0 <= dw < kw, inside the row (max_nan: NaN wins). Columns [lo, hi) have their whole window inside the row
   (interior_columns): vectorised, and compiled for constant kw, sw where the caller passes them. */
static inline __attribute__((always_inline)) void row_maxima(const float *row, float *yr, long W, long OW, long lo,
                                                            long hi, long kw, long sw, long pw) {
    for (long ow = 0; ow < OW; ++ow) {
        if (ow == lo && lo < hi) {  /* the interior, vectorised */
            const float *r = row + lo * sw - pw;
            #pragma omp simd
            for (long o = 0; o < hi - lo; ++o) {
                float m = r[o * sw];
                for (long dw = 1; dw < kw; ++dw) m = max_nan(m, r[o * sw + dw]);
                yr[lo + o] = m;
            }
            ow = hi - 1;
            continue;
        }
        long w0 = ow * sw - pw, w = w0 < 0 ? 0 : w0, w1 = w0 + kw < W ? w0 + kw : W;  /* an edge column, clipped */
        float m = row[w];
        for (++w; w < w1; ++w) m = max_nan(m, row[w]);
        yr[ow] = m;
    }
}

/* Max pooling of P planes (H x W floats each) into OH x OW: windows kh x kw at strides sh, sw starting at
   -ph, -pw, clipped to the plane (PyTorch's -inf padding; dilation 1). Each output row: the max over the
   window's rows into a row buffer (contiguous, vectorised), then over each window's columns (row_maxima).
   rows: nt x W floats. */
void senet_max_pool2d(const float *x, float *y, long P, long H, long W, long OH, long OW, long kh, long kw,
                      long sh, long sw, long ph, long pw, float *rows, int nt) {
    long lo, hi;
    interior_columns(W, OW, kw, sw, pw, &lo, &hi);
    #pragma omp parallel num_threads(nt) if(nt > 1 && P * H * W > 32768)
    {
#ifdef _OPENMP
        float *row = rows + (long)omp_get_thread_num() * W;
#else
        float *row = rows;
#endif
        #pragma omp for schedule(static)
        for (long p = 0; p < P; ++p) {
            const float *xp = x + p * H * W;
            float *yp = y + p * OH * OW;
            for (long oh = 0; oh < OH; ++oh) {
                long h0 = oh * sh - ph, h1 = h0 + kh;
                if (h0 < 0) h0 = 0;
                if (h1 > H) h1 = H;
                memcpy(row, xp + h0 * W, W * sizeof(float));
                for (long h = h0 + 1; h < h1; ++h) {
                    const float *r = xp + h * W;
                    #pragma omp simd
                    for (long w = 0; w < W; ++w) row[w] = max_nan(row[w], r[w]);
                }
                float *yr = yp + oh * OW;
                if (sw == 2 && kw == 3) row_maxima(row, yr, W, OW, lo, hi, 3, 2, pw);  /* ResNet's stem */
                else row_maxima(row, yr, W, OW, lo, hi, kw, sw, pw);
            }
        }
    }
}

/* The windows of one input row r (W floats) for every output column: hv[ow] = the maximum of r over columns
   ow * sw - pw + dw, 0 <= dw < kw, inside the row, hc[ow] = that dw; the first maximum, or the last NaN (scanning in
   order, a larger value or a NaN takes over). Output columns [lo, hi) have their whole window inside the row. */
static inline __attribute__((always_inline)) void row_windows(const float *r, float *hv, int *hc, long W,
                                                             long OW, long lo, long hi, long kw, long sw, long pw) {
    for (long ow = 0; ow < OW; ++ow) {  /* the edge columns, clipped */
        if (ow == lo) ow = hi;
        if (ow >= OW) break;
        long w0 = ow * sw - pw, w = w0 < 0 ? 0 : w0, w1 = w0 + kw < W ? w0 + kw : W;
        float m = r[w];
        long at = w;
        for (++w; w < w1; ++w)
            if (r[w] > m || r[w] != r[w]) { m = r[w]; at = w; }
        hv[ow] = m;
        hc[ow] = (int)(at - w0);
    }
    const float *r0 = r - pw;
    #pragma omp simd
    for (long o = lo; o < hi; ++o) {
        float m = r0[o * sw];
        int c = 0;
        for (long dw = 1; dw < kw; ++dw) {
            float v = r0[o * sw + dw];
            int take = v > m || v != v;
            m = take ? v : m;
            c = take ? (int)dw : c;
        }
        hv[o] = m;
        hc[o] = c;
    }
}

/* senet_max_pool2d that also gives each output's position in its window, at = dh * kw + dw (from the window's
   unclipped origin), as PyTorch picks it: scanning the window row by row, a larger value or a NaN takes over (the
   first maximum, or the last NaN). Each row's windows first (row_windows), then the rows in order by the same
   rule: the same choice. kh * kw <= 256. work: nt x OW x 4 floats. */
void senet_max_pool2d_argmax(const float *x, float *y, unsigned char *at, long P, long H, long W, long OH, long OW,
                             long kh, long kw, long sh, long sw, long ph, long pw, float *work, int nt) {
    long lo, hi;
    interior_columns(W, OW, kw, sw, pw, &lo, &hi);
    #pragma omp parallel num_threads(nt) if(nt > 1 && P * H * W > 32768)
    {
#ifdef _OPENMP
        float *hv = work + (long)omp_get_thread_num() * 4 * OW;
#else
        float *hv = work;
#endif
        float *best = hv + OW;
        int *hc = (int *)(hv + 2 * OW), *pos = (int *)(hv + 3 * OW);
        #pragma omp for schedule(static)
        for (long p = 0; p < P; ++p) {
            const float *xp = x + p * H * W;
            for (long oh = 0; oh < OH; ++oh) {
                long h0 = oh * sh - ph, h = h0 < 0 ? 0 : h0, h1 = h0 + kh < H ? h0 + kh : H;
                float *yr = y + (p * OH + oh) * OW;
                unsigned char *ar = at + (p * OH + oh) * OW;
                for (long first = 1; h < h1; ++h, first = 0) {
                    const float *r = xp + h * W;
                    if (sw == 2 && kw == 3) row_windows(r, hv, hc, W, OW, lo, hi, 3, 2, pw);
                    else if (sw == 1) row_windows(r, hv, hc, W, OW, lo, hi, kw, 1, pw);
                    else row_windows(r, hv, hc, W, OW, lo, hi, kw, sw, pw);
                    int dh = (int)((h - h0) * kw);
                    if (first) {
                        for (long ow = 0; ow < OW; ++ow) { best[ow] = hv[ow]; pos[ow] = dh + hc[ow]; }
                        continue;
                    }
                    #pragma omp simd
                    for (long ow = 0; ow < OW; ++ow) {
                        float v = hv[ow];
                        int take = v > best[ow] || v != v;
                        best[ow] = take ? v : best[ow];
                        pos[ow] = take ? dh + hc[ow] : pos[ow];
                    }
                }
                for (long ow = 0; ow < OW; ++ow) { yr[ow] = best[ow]; ar[ow] = (unsigned char)pos[ow]; }
            }
        }
    }
}

/* dx = the gradient of max pooling given g = dL/dy and senet_max_pool2d_argmax's positions: each output's gradient
   added at its window's maximum (overlapping windows add up). dx is zeroed here. kh * kw <= 256. */
void senet_max_pool2d_backward(const float *g, const unsigned char *at, float *dx, long P, long H, long W, long OH,
                               long OW, long kh, long kw, long sh, long sw, long ph, long pw, int nt) {
    long dh[256], dw[256];  /* a position's row and column in its window, without a division per output */
    for (long i = 0; i < kh * kw; ++i) { dh[i] = i / kw; dw[i] = i % kw; }
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && P * H * W > 32768)
    for (long p = 0; p < P; ++p) {
        const float *gp = g + p * OH * OW;
        const unsigned char *ap = at + p * OH * OW;
        float *dp = dx + p * H * W;
        memset(dp, 0, H * W * sizeof(float));
        for (long oh = 0; oh < OH; ++oh) {
            long origin = (oh * sh - ph) * W - pw;  /* the windows' unclipped origin: their row, column -pw */
            for (long ow = 0; ow < OW; ++ow) {
                unsigned char a = ap[oh * OW + ow];
                dp[origin + dh[a] * W + ow * sw + dw[a]] += gp[oh * OW + ow];
            }
        }
    }
}
"""

_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "senet_bn_add_relu": [_P] * 7 + [_F] + [_L] * 3 + [_P, _I],
    "senet_se_unit_end": [_P] * 7 + [_F] + [_P] * 4 + [_L] * 4 + [_P] * 3 + [_L, _P, _P, _I],
    "senet_bn_relu": [_P] * 6 + [_F] + [_L] * 3 + [_P, _P, _I],
    "senet_se_scale": [_P] * 6 + [_L] * 4 + [_P, _I],
    "senet_se_scale_backward": [_P] * 12 + [_L] * 4 + [_P, _I],
    "senet_max_pool2d": [_P] * 2 + [_L] * 11 + [_P, _I],
    "senet_max_pool2d_argmax": [_P] * 3 + [_L] * 11 + [_P, _I],
    "senet_max_pool2d_backward": [_P] * 3 + [_L] * 11 + [_I],
}

_lock = threading.Lock()
_off = False  # within ``off()``
_state: dict = {"lib": None, "tried": False, "why": "not built yet", "openmp": False, "path": None}


def _disabled_by_env() -> bool:
    return os.environ.get("SENET_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _torch_gomp_loaded() -> bool:
    """Whether this process already runs GNU OpenMP (torch's Linux wheels bring their own libgomp): a
    library built with ``-fopenmp`` then binds to that very runtime (same soname), sharing its threads."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("SENET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "senet")
    return Path(root) / "native"


def arch_flags() -> list[str]:
    """The compiler's target flags for code built here to run here: this CPU's widest vectors on x86."""
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []


def _build(cc: str, openmp: bool) -> Path:
    """Compile ``SOURCE`` into the cache (atomically: a finished library or none) and return its path."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", *arch_flags()]
    if openmp:
        flags.append("-fopenmp")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C compiler {cc!r} does not run: {e}") from None
    key = hashlib.sha256("\n".join([SOURCE, cc, version, " ".join(flags), _cpu_flags(),
                                    platform.platform()]).encode()).hexdigest()[:16]
    user = os.getuid() if hasattr(os, "getuid") else 0
    for root in (_cache_dir(), Path(tempfile.gettempdir()) / f"senet-native-{user}"):
        lib = root / f"senet_kernels_{key}.so"
        if lib.is_file():
            return lib
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=root, prefix=".build-", suffix=".so")
        except OSError:
            continue  # not writable: the next place
        os.close(fd)
        src = Path(tmp).with_suffix(".c")
        try:
            src.write_text(SOURCE)
            done = subprocess.run([cc, *flags, str(src), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} {' '.join(flags)} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, lib)  # atomic: another process sees the whole library or none
            return lib
        except subprocess.SubprocessError as e:
            raise RuntimeError(f"{cc} did not finish: {e}") from None
        finally:
            for leftover in (src, Path(tmp)):
                leftover.unlink(missing_ok=True)
    raise RuntimeError(f"no writable cache directory ({_cache_dir()} or the temp directory)")


def library() -> ctypes.CDLL | None:
    """The kernels, built and loaded on first call; None where they cannot be (``status()`` says why)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        lib, why = None, "built"
        if _disabled_by_env():
            why = "off: SENET_NATIVE=0"
        elif not sys.platform.startswith(("linux", "darwin")):
            why = f"not built on {sys.platform} (Linux and macOS only)"
        elif (cc := _compiler()) is None:
            why = "no C compiler found (set $CC, or install cc/gcc/clang)"
        else:
            openmp = _torch_gomp_loaded()
            try:
                path = _build(cc, openmp)
                lib = ctypes.CDLL(str(path))
                for name, argtypes in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, None
                _state.update(openmp=openmp, path=str(path))
            except (RuntimeError, OSError, AttributeError) as e:
                lib, why = None, f"build failed: {e}"
                warnings.warn(f"senet: native CPU kernels unavailable ({why}); using PyTorch's ops (same results, "
                              "slower at small batches). Set SENET_NATIVE=0 to skip them without this warning.",
                              RuntimeWarning, stacklevel=3)
        _state.update(lib=lib, why=why, tried=True)
        return lib


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Within this context senet does not call the native kernels (PyTorch's ops instead; for A/B timing
    and tests). ``SENET_NATIVE=0`` in the environment does the same for the whole process."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def status() -> dict:
    """Whether the native kernels run here: built (path, OpenMP or one thread) or why not. Builds them if
    that has not been tried yet."""
    library()
    return report()


def report() -> dict:
    """``status()`` without building: what this process has used so far (for results files' provenance)."""
    if not _state["tried"]:
        return {"available": None, "why": "not needed in this process so far", "openmp": None, "path": None}
    return {"available": _state["lib"] is not None, "why": _state["why"], "openmp": _state["openmp"],
            "path": _state["path"]}


def _ptr(t: torch.Tensor | Means | None) -> int | None:
    return None if t is None else t.data_ptr()


class Means:
    """``mean_hw`` of a ``bn_relu`` pass's output, (B, C) float32 at ``offset`` floats into ``buf`` (the pass's
    scratch, kept alive here), handed to ``se_unit_end`` without making a tensor of it. At batch 1 every tensor
    made between two convolutions costs its unit ~12-14 us, the caches cold (se_resnet50 on an AMD EPYC, timed in
    place: the slice and view this replaced took ~0.4 ms a forward; docs/performance.md); ``tensor()`` makes one
    where wanted."""

    __slots__ = ("buf", "offset", "shape", "_ptr")

    def __init__(self, buf: torch.Tensor, offset: int, n: int, ch: int):
        self.buf, self.offset, self.shape = buf, offset, (n, ch)
        self._ptr = buf.data_ptr() + 4 * offset

    def data_ptr(self) -> int:
        return self._ptr

    def tensor(self) -> torch.Tensor:
        n, ch = self.shape
        return self.buf[self.offset:self.offset + n * ch].view(n, ch)


def _threads() -> int | None:
    """Threads for a call: torch's count with OpenMP; 1 when the library is serial and torch runs one
    thread; None (decline) when it is serial and torch runs more (PyTorch's ops would use them)."""
    n = torch.get_num_threads()
    return n if _state["openmp"] or n == 1 else None


_F32 = torch.float32
try:  # torch >= 2.4 takes the device type; before, the CPU had a function of its own
    torch.is_autocast_enabled("cpu")
    _cpu_autocast = functools.partial(torch.is_autocast_enabled, "cpu")
except TypeError:
    _cpu_autocast = torch.is_autocast_cpu_enabled
# A unit end's squeeze reads the last 1x1 conv's input and weight instead of its output (``_through_conv``)
# when that reads at least this many fewer elements and the product W mean_hw h takes at most 4 multiply-adds per
# element saved (se_resnet50, one thread, per unit end: batch 1 stage 1 697 against 819 us, stage 2 even; batch
# 16 stage 3 4.2 against 5.8 ms, stage 4, where the product is 16.8M multiply-adds for 0.2M elements saved,
# 5.2 against 3.8 ms: declined; docs/performance.md item 13). With mean_hw h from the pass that wrote h
# (``bn_relu``) the squeeze reads the weight alone: batch 1, in place, stage 1 12 against 39 us (reading h), stage
# 2 25 against 40; stage 3, where W (262144) outweighs c (200704), 74 against 34 reading c: declined (item 14).
SQUEEZE_THROUGH_CONV_MIN_SAVING = 2**15


def _fits(c: torch.Tensor) -> bool:
    """A float32, contiguous, 4-d CPU tensor, no autocast (cheap checks: this runs per unit, per call)."""
    return c.dtype is _F32 and c.is_cpu and c.dim() == 4 and c.is_contiguous() and not _cpu_autocast()


def _bn_tensors(bn: nn.Module, channels: int) -> tuple | None:
    """(weight, bias, running_mean, running_var) of a plain BatchNorm2d in eval mode over ``channels``,
    all float32 contiguous CPU tensors (weight and bias may be None); None for anything else."""
    if type(bn) is not nn.BatchNorm2d or bn.training or bn.num_features != channels:
        return None
    p, b = bn._parameters, bn._buffers  # dicts, not Module.__getattr__ (~0.6 us each)
    ts = (p["weight"], p["bias"], b["running_mean"], b["running_var"])
    if ts[2] is None or ts[3] is None or not _float_params(ts, channels):
        return None
    return ts


def _float_params(ts: tuple, size: int) -> bool:
    """Every tensor in ``ts`` (None: absent) float32, contiguous, on the CPU, ``size`` elements."""
    for t in ts:  # a loop, not all(generator): this runs per unit, per call
        if t is not None and not (t.dtype is _F32 and t.is_cpu and t.is_contiguous() and t.numel() == size):
            return False
    return True


def _bn_call(bn: nn.Module, c: torch.Tensor) -> tuple | None:
    """(library, threads, BN's tensors) when the kernels can apply the eval-mode BN ``bn`` to ``c``."""
    lib = _state["lib"] if _state["tried"] else library()
    if lib is None or _off or not _fits(c):
        return None
    nt = _threads()
    if nt is None or (bnt := _bn_tensors(bn, c.shape[1])) is None:
        return None
    return lib, nt, bnt


def bn_add_relu(bn: nn.Module, c: torch.Tensor, shortcut: torch.Tensor, inplace: bool = False) -> torch.Tensor | None:
    """``relu(bn(c) + shortcut)`` in one pass (into a new tensor), or None where it does not apply.
    The caller has checked: eager inference, fast path enabled, a ReLU after the addition, nobody
    watching ``bn`` or the ReLU."""
    if shortcut.shape != c.shape or not _fits(shortcut) or (call := _bn_call(bn, c)) is None:
        return None
    lib, nt, (w, b, rm, rv) = call
    n, ch, h, wd = c.shape
    y = c if inplace else torch.empty_like(c)
    tmp = c.new_empty(2 * ch)
    lib.senet_bn_add_relu(c.data_ptr(), shortcut.data_ptr(), y.data_ptr(), rm.data_ptr(), rv.data_ptr(),
                          _ptr(w), _ptr(b), bn.eps, n, ch, h * wd, tmp.data_ptr(), nt)
    return y


def bn_relu(bn: nn.Module, c: torch.Tensor, inplace: bool = False,
            mean: bool = False) -> tuple[torch.Tensor, Means | None] | None:
    """``(relu(bn(c)), mean_hw of it or None)`` in one pass, or None where it does not apply. ``mean``: also the
    per-(b, c) means (B, C), from the same pass, as a ``Means`` (``se_unit_end``'s ``h_mean``). ``inplace``: the
    result may go into ``c``. The caller has checked: eager inference, fast path enabled, a ReLU after ``bn``,
    nobody watching either."""
    call = _bn_call(bn, c)
    if call is None:
        return None
    lib, nt, (w, b, rm, rv) = call
    n, ch, h, wd = c.shape
    y = c if inplace else torch.empty_like(c)
    tmp, hm = bn_relu_scratch(c, n, ch, mean)
    lib.senet_bn_relu(c.data_ptr(), y.data_ptr(), rm.data_ptr(), rv.data_ptr(), _ptr(w), _ptr(b), bn.eps,
                      n, ch, h * wd, _ptr(hm), tmp.data_ptr(), nt)
    return y, hm


def bn_relu_scratch(c: torch.Tensor, n: int, ch: int, mean: bool) -> tuple[torch.Tensor, Means | None]:
    """``senet_bn_relu``'s ``tmp`` for ``c`` (B = n, C = ch): 2 C floats, and B C more for the means with ``mean``,
    handed on as a ``Means`` into it (else None)."""
    tmp = c.new_empty(2 * ch + (n * ch if mean else 0))
    return tmp, Means(tmp, 2 * ch, n, ch) if mean else None


def _se_weights(attn: nn.Module, channels: int) -> tuple | None:
    """(w1, b1, w2, b2) of a plain SE block over ``channels`` (``SqueezeExcite._lean_weights``) in the
    layout the kernels read (float32, contiguous, W1 r x C, W2 C x r); None for anything else."""
    lean = getattr(attn, "_lean_weights", None)
    weights = None if lean is None else lean()
    if weights is None:
        return None
    w1, b1, w2, b2 = weights
    if w1.dim() != 2 or w1.shape[1] != channels:
        return None
    r = w1.shape[0]
    if not (_float_params((w1, w2), r * channels) and _float_params((b1,), r) and _float_params((b2,), channels)
            and w2.shape == (channels, r)):
        return None
    return weights


def _se_call(attn: nn.Module, x: torch.Tensor) -> tuple | None:
    """(library, threads, SE weights) when the kernels can compute the plain SE block ``attn`` on ``x``."""
    lib = _state["lib"] if _state["tried"] else library()
    if lib is None or _off or not _fits(x):
        return None
    nt = _threads()
    if nt is None or (weights := _se_weights(attn, x.shape[1])) is None:
        return None
    return lib, nt, weights


def se_unit_end(attn: nn.Module, bn: nn.Module, c: torch.Tensor, shortcut: torch.Tensor,
                inplace: bool = False, conv_in: tuple[nn.Module, torch.Tensor] | None = None,
                h_mean: torch.Tensor | Means | None = None) -> torch.Tensor | None:
    """``relu(attn(bn(c)) + shortcut)`` for a plain SE block in one kernel call, or None where it does not
    apply. The caller has checked what ``bn_add_relu`` says, for ``attn`` too. ``inplace``: the result may go
    into ``c``. ``conv_in=(conv, h)``: ``c == conv(h)``; the squeeze may then read ``h`` and the conv's weight
    instead of ``c`` (``_through_conv``), or only the weight with ``h_mean``, ``mean_hw h`` (B, Ch) from the
    pass that wrote ``h`` (``bn_relu``)."""
    call = _se_call(attn, c)
    if call is None or shortcut.shape != c.shape or not _fits(shortcut):
        return None
    lib, nt, (w1, b1, w2, b2) = call
    if (bnt := _bn_tensors(bn, c.shape[1])) is None:
        return None
    bw, bb, rm, rv = bnt
    n, ch, h, wd = c.shape
    r = w1.shape[0]
    y = c if inplace else torch.empty_like(c)
    hin, w3, b3, h_mean = (None,) * 4 if conv_in is None else _through_conv(*conv_in, c, h_mean)
    ch_in = 0 if w3 is None else w3.shape[1]
    tmp = c.new_empty(se_unit_end_scratch(n, ch, r, ch_in))
    lib.senet_se_unit_end(c.data_ptr(), shortcut.data_ptr(), y.data_ptr(), rm.data_ptr(), rv.data_ptr(),
                          _ptr(bw), _ptr(bb), bn.eps, w1.data_ptr(), _ptr(b1), w2.data_ptr(), _ptr(b2),
                          n, ch, r, h * wd, _ptr(hin), _ptr(w3), _ptr(b3), ch_in, _ptr(h_mean), tmp.data_ptr(), nt)
    return y


def squeeze_through_pays(c_numel: int, h_read: int, w_numel: int, batch: int) -> bool:
    """The size rule of ``_through_conv``: reading ``h_read`` elements of conv3's input (0 with ``h_mean``) and its
    ``w_numel``-element weight instead of ``c``'s ``c_numel`` saves at least ``SQUEEZE_THROUGH_CONV_MIN_SAVING`` and
    costs at most 4 multiply-adds per element saved."""
    saving = c_numel - h_read - w_numel
    return saving >= SQUEEZE_THROUGH_CONV_MIN_SAVING and w_numel * batch <= 4 * saving


def se_unit_end_scratch(n: int, ch: int, r: int, ch_in: int) -> int:
    """Floats of ``senet_se_unit_end``'s ``tmp`` (its C comment): 3 B C + B R + 2 C + B Ch."""
    return 3 * n * ch + n * r + 2 * ch + n * ch_in


def _through_conv(conv: nn.Module, h: torch.Tensor, c: torch.Tensor,
                  h_mean: torch.Tensor | Means | None = None) -> tuple:
    """(h, weight, bias, h_mean) when the squeeze of ``c == conv(h)`` may read ``h`` and ``conv``'s weight
    instead of ``c`` and that reads at least ``SQUEEZE_THROUGH_CONV_MIN_SAVING`` fewer elements: a plain,
    unhooked 1x1 conv (stride 1, no padding, one group) in float32, for which ``mean_hw conv(h) = W mean_hw h + b``.
    With ``h_mean`` (``mean_hw h``, (B, Ch) float32, known from the pass that wrote ``h``: a ``Means`` from
    ``bn_relu``, or a tensor) only the weight is read
    in place of ``c``; an ``h_mean`` of another shape or kind is not used (None in the result).
    Else (None, None, None, None): the squeeze reads ``c``."""
    if type(conv) is not nn.Conv2d:
        return None, None, None, None
    weight, bias = conv.weight, conv.bias
    n, ch = c.shape[0], c.shape[1]
    if h_mean is not None and (h_mean.shape != (n, h.shape[1]) or (
            type(h_mean) is not Means and not _float_params((h_mean,), h_mean.numel()))):
        h_mean = None
    if (not squeeze_through_pays(c.numel(), 0 if h_mean is not None else h.numel(), weight.numel(), n)
            or weight.dim() != 4
            or not plain_pointwise_conv(conv) or not _fits(h) or h.shape != (n, weight.shape[1], *c.shape[2:])
            or not _float_params((weight,), ch * weight.shape[1]) or not _float_params((bias,), ch)):
        return None, None, None, None
    return h, weight, bias, h_mean


def se_scale(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``attn(x) = x * s`` for a plain SE block alone (squeeze, excitation, scale in one call), or None
    where it does not apply. The caller has checked: eager inference, fast path enabled, nobody hooking."""
    call = _se_call(attn, x)
    return None if call is None else _se_forward(x, *call)[0]


def _se_forward(x: torch.Tensor, lib: ctypes.CDLL, nt: int, weights: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = x s, work = z | h | s, the kernel's by-products that backward needs) of the plain SE block
    with ``weights`` (w1, b1, w2, b2) on ``x``: squeeze, excitation and scale in one call."""
    w1, b1, w2, b2 = weights
    n, ch, h, wd = x.shape
    r = w1.shape[0]
    y = torch.empty_like(x)
    work = x.new_empty(2 * n * ch + n * r)
    lib.senet_se_scale(x.data_ptr(), y.data_ptr(), w1.data_ptr(), _ptr(b1), w2.data_ptr(), _ptr(b2),
                       n, ch, r, h * wd, work.data_ptr(), nt)
    return y, work


class _SEScale(torch.autograd.Function):
    """The plain SE block ``x * s`` in training, forward and backward each one native call.

    Forward keeps x and, from the kernel, z = mean_hw x, h = relu(W1 z + b1) and s (B x (2C + R) floats);
    backward (``senet_se_scale_backward``) computes dL/dx = g s + (dL/dz) / HW and the FCs' gradients from
    them: one pass over g and x for the sums Σ_hw g x, small products, one pass over g for dL/dx.
    Shapes: x (B, C, H, W); w1 (R, C), b1 (R,) or None, w2 (C, R), b2 (C,) or None."""

    @staticmethod
    def forward(ctx, x, lib, nt, w1, b1, w2, b2):
        y, work = _se_forward(x, lib, nt, (w1, b1, w2, b2))
        ctx.lib, ctx.nt = lib, nt
        ctx.save_for_backward(x, work, w1, w2)
        return y

    @staticmethod
    @_first_order_only  # no graph kept: double backward raises (fused._DOUBLE_BACKWARD)
    def backward(ctx, g):
        x, work, w1, w2 = ctx.saved_tensors
        n, ch, h, wd = x.shape
        r = w1.shape[0]
        g = g.contiguous()  # NCHW, as x (a no-op for what the next layer's backward gives)
        need = ctx.needs_input_grad
        dx = torch.empty_like(x) if need[0] else None
        dw1 = torch.empty_like(w1) if need[3] else None
        db1 = w1.new_empty(r) if need[4] else None  # False for an absent bias (a None input)
        dw2 = torch.empty_like(w2) if need[5] else None
        db2 = w2.new_empty(ch) if need[6] else None
        tmp = x.new_empty(2 * n * ch + n * r)
        z, hid, s = work.split([n * ch, n * r, n * ch])
        ctx.lib.senet_se_scale_backward(g.data_ptr(), x.data_ptr(), z.data_ptr(), hid.data_ptr(), s.data_ptr(),
                                        w1.data_ptr(), w2.data_ptr(), _ptr(dx), _ptr(dw1), _ptr(db1), _ptr(dw2),
                                        _ptr(db2), n, ch, r, h * wd, tmp.data_ptr(), ctx.nt)
        return dx, None, None, dw1, db1, dw2, db2


def se_scale_train(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``attn(x) = x * s`` for a plain SE block in training (autograd), forward and backward each one
    native call (``_SEScale``), or None where it does not apply. The caller has checked what
    ``fused.can_recompute`` says (grad wanted, eager, fast path on, nobody hooking)."""
    call = _se_call(attn, x)
    if call is None or x.numel() == 0:
        return None
    lib, nt, (w1, b1, w2, b2) = call
    return _SEScale.apply(x, lib, nt, w1, b1, w2, b2)


def _pair(v) -> tuple | None:
    """``(a, b)`` from an int or a pair of ints (an ``nn.MaxPool2d`` setting); None for anything else."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return v if len(v) == 2 and all(type(a) is int for a in v) else None


def _pooled_size(n: int, k: int, s: int, p: int, ceil: bool) -> int:
    """PyTorch's pooling output size (dilation 1): floor or ceil of (n + 2p - k) / s, plus 1; with ``ceil`` the
    last window must start inside the input or its left padding."""
    out = (n + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def _pool_geometry(pool: nn.Module, x: torch.Tensor) -> tuple | None:
    """(OH, OW, kh, kw, sh, sw, ph, pw) of ``pool`` (an ``nn.MaxPool2d``) on ``x``, or None where the kernel does not
    apply (dilation, indices asked for) or PyTorch would refuse the settings (it then raises its own error)."""
    k, s, p, d = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation)
    if k is None or s is None or p is None or d != (1, 1) or pool.return_indices:
        return None
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    if min(kh, kw, sh, sw) < 1 or not (0 <= ph <= kh // 2 and 0 <= pw <= kw // 2) or kh * kw > 256:
        return None  # (a position in a window is one byte)
    H, W = x.shape[2], x.shape[3]
    ceil = bool(pool.ceil_mode)
    oh, ow = _pooled_size(H, kh, sh, ph, ceil), _pooled_size(W, kw, sw, pw, ceil)
    if oh < 1 or ow < 1:
        return None
    return oh, ow, kh, kw, sh, sw, ph, pw


def _max_pool_forward(x: torch.Tensor, lib: ctypes.CDLL, nt: int, geometry: tuple,
                      positions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, at): the pooled ``x`` and, with ``positions``, each output's position in its window (uint8, for
    backward: ``senet_max_pool2d_argmax``), else None (``senet_max_pool2d``, values only)."""
    n, ch, h, w = x.shape
    oh, ow = geometry[:2]
    y = x.new_empty(n, ch, oh, ow)
    if not positions:
        rows = x.new_empty(nt * w)
        lib.senet_max_pool2d(x.data_ptr(), y.data_ptr(), n * ch, h, w, *geometry, rows.data_ptr(), nt)
        return y, None
    at = torch.empty(n, ch, oh, ow, dtype=torch.uint8, device=x.device)
    work = x.new_empty(4 * nt * ow)
    lib.senet_max_pool2d_argmax(x.data_ptr(), y.data_ptr(), at.data_ptr(), n * ch, h, w, *geometry, work.data_ptr(), nt)
    return y, at


class _MaxPool2d(torch.autograd.Function):
    """Max pooling in training, forward and backward each one native call: forward gives each output's position
    in its window as PyTorch picks it (``senet_max_pool2d_argmax``; one byte each, where PyTorch keeps an int64
    index), backward adds the gradient there (``senet_max_pool2d_backward``). Shapes: x (B, C, H, W)."""

    @staticmethod
    def forward(ctx, x, lib, nt, geometry):
        y, at = _max_pool_forward(x, lib, nt, geometry, positions=True)
        ctx.lib, ctx.geometry, ctx.shape = lib, geometry, x.shape
        ctx.save_for_backward(at)
        return y

    @staticmethod
    @_first_order_only  # no graph kept: double backward raises (fused._DOUBLE_BACKWARD)
    def backward(ctx, g):
        (at,) = ctx.saved_tensors
        n, ch, h, w = ctx.shape
        g = g.contiguous()
        nt = _threads() or 1  # the thread count may have changed since forward; one thread is always right
        dx = g.new_empty(ctx.shape)
        ctx.lib.senet_max_pool2d_backward(g.data_ptr(), at.data_ptr(), dx.data_ptr(), n * ch, h, w, *ctx.geometry, nt)
        return dx, None, None, None


def max_pool2d(pool: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``pool(x)`` for an ``nn.MaxPool2d`` in one native call (in training, backward too: ``_MaxPool2d``), or None
    where it does not apply: float32 contiguous NCHW CPU tensors, dilation 1, windows of at most 256 elements, no
    indices returned. The same values as PyTorch's (NaN wins a window) and the gradient at the same positions (the
    first maximum of a window, the last NaN). The caller has checked: eager mode, fast path enabled."""
    lib = _state["lib"] if _state["tried"] else library()
    if lib is None or _off or not _fits(x) or x.numel() == 0:
        return None
    nt = _threads()
    if nt is None or (geometry := _pool_geometry(pool, x)) is None:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2d.apply(x, lib, nt, geometry)
    return _max_pool_forward(x, lib, nt, geometry)[0]
