"""Native CPU kernels for eager inference: a residual unit's whole end in one call.

With PyTorch's ops as the unit of work, an SE-ResNet unit ends (in inference) in ``x = bn(c)``, a squeeze
``mean_hw x``, six small excitation calls and ``relu(x * s + shortcut)``: ten calls and four passes over
the activation. Eval-mode BN is affine per channel (``bn(c) = α c + β``), so the whole end is

    z = α mean_hw c + β,   s = σ(W2 relu(W1 z + b1) + b2),   y = relu(c (α s) + β s + shortcut)

one read of ``c`` for the squeeze and one pass that reads ``c`` and ``shortcut`` and writes ``y``. The
plain unit's end ``relu(bn(c) + shortcut)`` is the same pass without the scale (torchvision: three passes,
``bn``, ``+= identity``, ``relu``). Both are C functions here (``SOURCE``), built with the machine's C
compiler on first use, cached under ``~/.cache/senet/native`` (or ``$SENET_CACHE_DIR``) and called through
ctypes. Where torch runs on GNU OpenMP (Linux wheels) the kernels are built with OpenMP and share torch's
runtime and thread count; elsewhere they are single-threaded and used only while torch runs one thread.

Used only where nothing can tell the difference: eager inference (no autograd) on the CPU, float32
contiguous NCHW tensors, BN with running statistics, the plain SE block (``SqueezeExcite`` with Linear FCs,
ReLU, sigmoid, average pooling) and a ReLU after the addition, nobody hooking any of them, no autocast,
the fast path enabled (``fused.reference_path()`` turns these off too). Everything else takes PyTorch's ops.
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

from .fused import squeeze_through_conv

SOURCE = r"""
#include <math.h>
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

/* out[n * ld + j] = W[j] . v[n] for rows j0 <= j < j1 of W (rows of k floats) and each of the B vectors v[n]
   (k floats apart): four rows at a time, each block of rows read from memory once for all B vectors, with
   four independent vector accumulators (one would wait on its own additions) */
static void rows_dot(const float *W, const float *v, float *out, long j0, long j1, long k, long B, long ld) {
    long j = j0;
    for (; j + 4 <= j1; j += 4) {
        const float *w0 = W + j * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        for (long n = 0; n < B; ++n) {
            const float *vn = v + n * k;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            #pragma omp simd reduction(+:a0, a1, a2, a3)
            for (long i = 0; i < k; ++i) {
                float x = vn[i];
                a0 += w0[i] * x; a1 += w1[i] * x; a2 += w2[i] * x; a3 += w3[i] * x;
            }
            float *o = out + n * ld + j;
            o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3;
        }
    }
    for (; j < j1; ++j) {
        const float *w0 = W + j * k;
        for (long n = 0; n < B; ++n) {
            const float *vn = v + n * k;
            float a0 = 0.0f;
            #pragma omp simd reduction(+:a0)
            for (long i = 0; i < k; ++i) a0 += w0[i] * vn[i];
            out[n * ld + j] = a0;
        }
    }
}

/* this thread's share [*lo, *hi) of n rows, in blocks of four */
static void share(long n, long *lo, long *hi) {
#ifdef _OPENMP
    long t = omp_get_thread_num(), nt = omp_get_num_threads(), blocks = (n + 3) / 4;
    long per = blocks / nt, extra = blocks % nt;
    long b0 = t * per + (t < extra ? t : extra), b1 = b0 + per + (t < extra ? 1 : 0);
    *lo = b0 * 4 < n ? b0 * 4 : n;
    *hi = b1 * 4 < n ? b1 * 4 : n;
#else
    *lo = 0;
    *hi = n;
#endif
}

/* z (B, C) <- sigmoid(W2 relu(W1 z + b1) + b2); h: B R floats. W1: R x C, W2: C x R, row-major.
   Called by every thread of a team (or one): each computes its share of rows, then waits for the rest. */
static void excite(float *z, float *h, const float *w1, const float *b1, const float *w2, const float *b2,
                   long B, long C, long R) {
    long lo, hi;
    share(R, &lo, &hi);
    rows_dot(w1, z, h, lo, hi, C, B, R);
    for (long n = 0; n < B; ++n) {
        float *hn = h + n * R;
        for (long r = lo; r < hi; ++r) {
            float a = hn[r] + (b1 ? b1[r] : 0.0f);
            hn[r] = a > 0.0f ? a : 0.0f;
        }
    }
    #pragma omp barrier
    share(C, &lo, &hi);
    rows_dot(w2, h, z, lo, hi, R, B, C);  /* overwrites z's rows lo..hi: FC1 is done with z (barrier above) */
    for (long n = 0; n < B; ++n) {
        float *zn = z + n * C;
        if (b2) {
            #pragma omp simd
            for (long ch = lo; ch < hi; ++ch) zn[ch] += b2[ch];
        }
        #pragma omp simd
        for (long ch = lo; ch < hi; ++ch) zn[ch] = 1.0f / (1.0f + expf(-zn[ch]));  /* vector expf (libmvec) */
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

/* y = relu(bn(c) + sc); y may be c or sc. tmp: 2 C floats. */
void senet_bn_add_relu(const float *c, const float *sc, float *y, const float *rm, const float *rv,
                       const float *w, const float *b, float eps, long B, long C, long HW, float *tmp, int nt) {
    float *alpha = tmp, *beta = tmp + C;
    bn_affine(rm, rv, w, b, eps, C, alpha, beta);
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    affine_add_relu(c, sc, y, alpha, beta, B * C, C, HW);
}

/* z[p] = mean_hw bn(x) for every plane p (plain means when rm is NULL); tmp: 2 C floats */
void senet_squeeze(const float *x, float *z, const float *rm, const float *rv, const float *w, const float *b,
                   float eps, long B, long C, long HW, float *tmp, int nt) {
    float *alpha = rm ? tmp : 0, *beta = rm ? tmp + C : 0;
    if (rm) bn_affine(rm, rv, w, b, eps, C, alpha, beta);
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    squeeze(x, z, alpha, beta, B, C, HW);
}

/* y = relu(bn(c) s + sc), s = sigmoid(W2 relu(W1 mean_hw bn(c) + b1) + b2); y may be c or sc.
   s_in: s (B C floats) when the caller computed it (then the weights are not read), else NULL.
   tmp: 3 B C + B R + 2 C floats; on return its first B C floats are s. */
void senet_se_unit_end(const float *c, const float *sc, float *y, const float *rm, const float *rv,
                       const float *bw, const float *bb, float eps, const float *w1, const float *b1,
                       const float *w2, const float *b2, long B, long C, long R, long HW, const float *s_in,
                       float *tmp, int nt) {
    float *s = tmp, *k = s + B * C, *m = k + B * C, *h = m + B * C, *alpha = h + B * R, *beta = alpha + C;
    bn_affine(rm, rv, bw, bb, eps, C, alpha, beta);
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    {
        if (!s_in) {
            squeeze(c, s, alpha, beta, B, C, HW);
            excite(s, h, w1, b1, w2, b2, B, C, R);
        }
        const float *sv = s_in ? s_in : s;
        #pragma omp for schedule(static)
        for (long p = 0; p < B * C; ++p) {
            k[p] = alpha[p % C] * sv[p];
            m[p] = beta[p % C] * sv[p];
        }
        affine_add_relu(c, sc, y, k, m, B * C, B * C, HW);
    }
}

/* y = x s, s = sigmoid(W2 relu(W1 mean_hw x + b1) + b2): the SE block alone; y may be x.
   s_in: s when the caller computed it, else NULL. tmp: B C + B R floats; on return its first B C are s. */
void senet_se_scale(const float *x, float *y, const float *w1, const float *b1, const float *w2,
                    const float *b2, long B, long C, long R, long HW, const float *s_in, float *tmp, int nt) {
    float *s = tmp, *h = tmp + B * C;
    #pragma omp parallel num_threads(nt) if(nt > 1 && B * C * HW > 32768)
    {
        if (!s_in) {
            squeeze(x, s, 0, 0, B, C, HW);
            excite(s, h, w1, b1, w2, b2, B, C, R);
        }
        const float *sv = s_in ? s_in : s;
        #pragma omp for schedule(static)
        for (long p = 0; p < B * C; ++p) {
            float a = sv[p];
            const float *xp = x + p * HW;
            float *yp = y + p * HW;
            #pragma omp simd
            for (long i = 0; i < HW; ++i) yp[i] = xp[i] * a;
        }
    }
}
"""

_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "senet_bn_add_relu": [_P] * 7 + [_F] + [_L] * 3 + [_P, _I],
    "senet_squeeze": [_P] * 6 + [_F] + [_L] * 3 + [_P, _I],
    "senet_se_unit_end": [_P] * 7 + [_F] + [_P] * 4 + [_L] * 4 + [_P, _P, _I],
    "senet_se_scale": [_P] * 6 + [_L] * 4 + [_P, _P, _I],
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


def _build(cc: str, openmp: bool) -> Path:
    """Compile ``SOURCE`` into the cache (atomically: a finished library or none) and return its path."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
# Up to this batch the kernels compute the excitation themselves (matrix-vector products, bound by reading
# the weights); above it PyTorch's matrix products are faster (batch 16, 2048 channels: 0.33 vs 0.90 ms)
EXCITE_IN_C_MAX_BATCH = 4


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


def bn_add_relu(bn: nn.Module, c: torch.Tensor, shortcut: torch.Tensor, inplace: bool = False) -> torch.Tensor | None:
    """``relu(bn(c) + shortcut)`` in one pass (into a new tensor), or None where it does not apply.
    The caller has checked: eager inference, fast path enabled, a ReLU after the addition, nobody
    watching ``bn`` or the ReLU."""
    lib = _state["lib"] if _state["tried"] else library()
    if lib is None or _off or not _fits(c) or shortcut.shape != c.shape or not _fits(shortcut):
        return None
    nt = _threads()
    if nt is None or (bnt := _bn_tensors(bn, c.shape[1])) is None:
        return None
    w, b, rm, rv = bnt
    n, ch, h, wd = c.shape
    y = c if inplace else torch.empty_like(c)
    tmp = c.new_empty(2 * ch)
    lib.senet_bn_add_relu(c.data_ptr(), shortcut.data_ptr(), y.data_ptr(), rm.data_ptr(), rv.data_ptr(),
                          _ptr(w), _ptr(b), bn.eps, n, ch, h * wd, tmp.data_ptr(), nt)
    return y


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


def _squeeze(lib: ctypes.CDLL, x: torch.Tensor, nt: int, bn: nn.Module | None = None,
             bnt: tuple | None = None) -> torch.Tensor:
    """``mean_hw x`` (or ``mean_hw bn(x)``, ``bnt``: ``_bn_tensors(bn)``) per plane by the kernel, (B, C)."""
    n, ch, h, w = x.shape
    z = x.new_empty(n, ch)
    if bnt is None:
        lib.senet_squeeze(x.data_ptr(), z.data_ptr(), None, None, None, None, 0.0, n, ch, h * w, None, nt)
    else:
        bw, bb, rm, rv = bnt
        tmp = x.new_empty(2 * ch)  # held here: a tensor made inside the call's arguments is freed before it runs
        lib.senet_squeeze(x.data_ptr(), z.data_ptr(), rm.data_ptr(), rv.data_ptr(), _ptr(bw), _ptr(bb), bn.eps,
                          n, ch, h * w, tmp.data_ptr(), nt)
    return z


def se_unit_end(attn: nn.Module, bn: nn.Module, c: torch.Tensor, shortcut: torch.Tensor,
                inplace: bool = False, conv_in: tuple[nn.Module, torch.Tensor] | None = None) -> torch.Tensor | None:
    """``relu(attn(bn(c)) + shortcut)`` for a plain SE block, in one call (batches up to
    ``EXCITE_IN_C_MAX_BATCH``), or None where it does not apply. The caller has checked what ``bn_add_relu``
    says, for ``attn`` too. ``inplace``: the result may go into ``c``. ``conv_in=(conv, h)``: ``c == conv(h)``,
    larger batches may squeeze from ``h`` (``fused.squeeze_through_conv``)."""
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
    s = None
    if n > EXCITE_IN_C_MAX_BATCH:  # the FCs as matrix products: PyTorch's (BLAS) beat the kernel's loops
        z = None if conv_in is None else squeeze_through_conv(*conv_in, bn, c)  # reads the conv's smaller input
        s = attn.infer_excitation(c, _squeeze(lib, c, nt, bn, bnt) if z is None else z)
    tmp = c.new_empty(3 * n * ch + n * r + 2 * ch)
    lib.senet_se_unit_end(c.data_ptr(), shortcut.data_ptr(), y.data_ptr(), rm.data_ptr(), rv.data_ptr(),
                          _ptr(bw), _ptr(bb), bn.eps, w1.data_ptr(), _ptr(b1), w2.data_ptr(), _ptr(b2),
                          n, ch, r, h * wd, _ptr(s), tmp.data_ptr(), nt)
    return y


def se_scale(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``attn(x) = x * s`` for a plain SE block alone (squeeze, excitation, scale in one call), or None
    where it does not apply. The caller has checked: eager inference, fast path enabled, nobody hooking."""
    call = _se_call(attn, x)
    if call is None:
        return None
    lib, nt, (w1, b1, w2, b2) = call
    n, ch, h, wd = x.shape
    r = w1.shape[0]
    y = torch.empty_like(x)
    s = attn.infer_excitation(x, _squeeze(lib, x, nt)) if n > EXCITE_IN_C_MAX_BATCH else None  # as in se_unit_end
    tmp = x.new_empty(n * ch + n * r)
    lib.senet_se_scale(x.data_ptr(), y.data_ptr(), w1.data_ptr(), _ptr(b1), w2.data_ptr(), _ptr(b2),
                       n, ch, r, h * wd, _ptr(s), tmp.data_ptr(), nt)
    return y
