"""senet.allocator: glibc keeps freed memory (fewer page faults, counted by the kernel), nothing changes where
another allocator or the user's settings rule, and `senet train` applies it on CPU and records it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fake_allocator

from senet import allocator
from senet.cli import main as cli_main
from senet.train import TrainConfig, fit

# Allocates, fills and frees a 64 MB tensor (over glibc's 32 MB mmap ceiling, so mmap-ed by default) six times,
# like a training step's activations, counting each time's minor page faults: ~16384 (4 KB pages) when the
# memory went back to the kernel. Kept by glibc, the first two still fault (torch's 64-byte aligned request is a
# little larger than the block freed before it); from the third on the two freed blocks, merged, serve it.
REFILL = """
import json, resource, sys, torch
from senet import allocator
state = allocator.reuse_freed_memory() if sys.argv[1] == "reuse" else allocator.state()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(6):
    before = faults()
    x = torch.ones(16 << 20)
    counts.append(faults() - before)
    del x
print(json.dumps({"faults": counts, "state": state}))
"""
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}


def _refill(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", REFILL, mode], env=CLEAN_ENV, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _thp_always() -> bool:  # huge pages fault 2 MB at a time: the default's count is then ~32, not ~16384
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return p.is_file() and "[always]" in p.read_text()


@pytest.mark.skipif(allocator._unsupported() is not None, reason="needs glibc without malloc settings")
def test_reuse_freed_memory_stops_the_page_faults():
    reuse, default = _refill("reuse"), _refill("default")
    assert reuse["state"] == {"applied": True, "why": "M_MMAP_MAX=0, M_TRIM_THRESHOLD=2147483647"}
    assert default["state"]["applied"] is False and "not asked" in default["state"]["why"]
    assert sum(reuse["faults"][3:]) < 100, reuse  # the freed memory came back from glibc's heap, already mapped
    if not _thp_always():  # the control: without it, every time faults the pages in again
        assert min(default["faults"][3:]) > 8000, default


@pytest.mark.parametrize("env, platform, why", [
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "linux", "LD_PRELOAD"),
    ({"MALLOC_MMAP_MAX_": "0"}, "linux", "MALLOC_MMAP_MAX_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "linux", "GLIBC_TUNABLES"),
    ({}, "darwin", "darwin"),
])
def test_other_allocators_and_user_settings_are_left_alone(monkeypatch, env, platform, why):
    for k in ("LD_PRELOAD", "GLIBC_TUNABLES", *allocator._USER_SETTINGS):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(allocator, "_state", {"applied": False, "why": "not asked"})

    def refuse(*a, **k):
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(allocator.ctypes, "CDLL", refuse)
    if platform == "linux" and not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        pytest.skip("not glibc")
    got = allocator.reuse_freed_memory()
    assert got["applied"] is False and why in got["why"] and allocator.state() == got


def test_train_applies_it_on_cpu_records_it_and_obeys_the_flag(tmp_path, monkeypatch):
    calls = fake_allocator(monkeypatch)
    tiny = ["resnet20", "--image-size", "8", "--subset", "64", "--batch-size", "32", "--epochs", "1", "--quiet",
            "--device", "cpu"]
    assert cli_main(["train", *tiny, "--no-reuse-freed-memory", "--out", str(tmp_path / "off")]) == 0
    off = json.loads((tmp_path / "off" / "config.json").read_text())
    assert calls == [] and off["config"]["reuse_freed_memory"] is False
    assert off["device"]["allocator"] == {"applied": False, "why": "not asked"}
    assert cli_main(["train", *tiny, "--out", str(tmp_path / "on")]) == 0
    on = json.loads((tmp_path / "on" / "config.json").read_text())
    assert calls == [1] and on["config"]["reuse_freed_memory"] is True
    assert on["device"]["allocator"] == {"applied": True, "why": "test"}
    assert TrainConfig().reuse_freed_memory is True
    # a resumed run may change it (it does not change the result); the saved config keeps the rest
    r = fit(TrainConfig(resume=str(tmp_path / "on"), reuse_freed_memory=False, quiet=True))
    assert r.config["reuse_freed_memory"] is False and r.config["subset"] == 64
