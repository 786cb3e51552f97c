"""Where a result came from: the block every senet results file and checkpoint carries, and atomic writes.

``provenance(config, device)`` is ``{"config", "versions", "device", "git_revision", "created"}``;
``write_json`` and ``atomic_write_bytes`` write so that a reader sees the old file or the new one,
never a half-written one (temp file in the same directory, fsync, ``os.replace``, directory fsync).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from senet import allocator


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """senet's checkout commit (``-dirty`` if it has uncommitted changes), or None outside git. Where
    ``SENET_GIT_REVISION`` is set, what it says, marked ``(from SENET_GIT_REVISION)``: for a copy of the tree sent
    to another machine, whose .git (if any) need not be the commit the copy was made from.

    Computed once per process: a long run records the revision it started from.
    """
    given = os.environ.get("SENET_GIT_REVISION", "").strip()
    if given:
        return f"{given} (from SENET_GIT_REVISION)"
    cwd = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """senet, torch, numpy and Python versions."""
    from senet import __version__

    return {"senet": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo on Linux) with its logical core count."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def now() -> str:
    """Local time with its UTC offset, e.g. ``2026-01-01T12:00:00+0100``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# environment variables that change speed without changing code: thread pools, the allocator
_PERF_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "DNNL_", "ONEDNN_", "MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD",
                      "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_", "SENET_NATIVE")


def performance_env() -> dict[str, str]:
    """The set environment variables that change speed without changing code (thread pools, allocator
    settings such as ``MALLOC_MMAP_MAX_`` or an ``LD_PRELOAD``-ed jemalloc, inductor options)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_PERF_ENV_PREFIXES)}


def _native() -> dict:
    """Whether senet's native CPU kernels (``senet.layers.native``) ran in this process, without building them."""
    from senet.layers import native

    return native.report()


def provenance(config: dict, device: torch.device | str) -> dict:
    """The block every senet results file carries: config, versions, device (with the environment
    variables and the allocator settings that change speed), git revision, time."""
    return {
        "config": config,
        "versions": versions(),
        "device": {"type": torch.device(device).type, "name": device_name(device),
                   "threads": torch.get_num_threads(), "env": performance_env(), "native_kernels": _native(),
                   "allocator": allocator.state()},
        "git_revision": git_revision(),
        "created": now(),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically (numpy values, paths, devices and dtypes allowed)."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=_json_default) + "\n").encode())
    return path


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def atomic_write_bytes(path: str | Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["atomic_write_bytes", "device_name", "git_revision", "now", "provenance", "versions", "write_json"]
