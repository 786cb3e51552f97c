"""Keep freed host memory for the next training step (glibc's ``mallopt``).

glibc serves a block of 32 MB or more (and, until its adaptive threshold has grown, any block over
128 KB) with a fresh ``mmap`` and returns it to the kernel when freed; it also trims its heap whenever
more than its threshold lies free at the top. A CPU training step frees most of its activations and
gradients before the next step allocates them again, so every step page-faults them all back in, and
the kernel zeroes each page first: a batch-16 ResNet-50 step took 310-430 thousand minor faults and 0.8-1.2 s
of system time on this project's machine, 3,000-16,000 and 0.04-0.2 s with this setting, and 0.89x the time
(``benchmarks/cpu_allocator.py``, docs/performance.md).

:func:`reuse_freed_memory` tells glibc to serve every block from its heap and keep what is freed
(``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB - 1), the same as ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment. Process-wide and for the rest of the process:
peak memory is kept rather than returned to the system. ``senet train`` applies it on CPU unless told
``--no-reuse-freed-memory``. Elsewhere (macOS, Windows, musl, a preloaded jemalloc/tcmalloc, or the
user's own glibc malloc settings) it changes nothing and says why.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
TRIM_NEVER = 2**31 - 1  # mallopt takes an int
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_state = {"applied": False, "why": "not asked (senet.allocator.reuse_freed_memory)"}


def _unsupported() -> str | None:
    """Why mallopt should not be called in this process, or None."""
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform}); the platform's allocator is left as it is"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc"):
        return "not glibc (musl or another C library); its allocator is left as it is"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return f"LD_PRELOAD={preload!r} replaces malloc; left to it"
    user = [k for k in _USER_SETTINGS if k in os.environ]
    if user or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return f"the environment sets glibc's malloc ({', '.join(user) or 'GLIBC_TUNABLES'}); left as set"
    return None


def reuse_freed_memory() -> dict:
    """Ask glibc to keep freed memory for reuse (see the module docstring). Returns (and remembers, for
    :func:`state` and every results file's provenance) ``{"applied": bool, "why": str}``; never raises."""
    global _state
    why = _unsupported()
    if why is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) == 1
        except (OSError, AttributeError) as e:
            ok, why = False, f"mallopt unavailable ({e})"
        why = why or ("M_MMAP_MAX=0, M_TRIM_THRESHOLD=2147483647" if ok else "mallopt refused the settings")
        _state = {"applied": ok, "why": why}
    elif not _state["applied"]:
        _state = {"applied": False, "why": why}
    return dict(_state)


def state() -> dict:
    """Whether :func:`reuse_freed_memory` changed this process's allocator, and how or why not."""
    return dict(_state)


__all__ = ["reuse_freed_memory", "state"]
