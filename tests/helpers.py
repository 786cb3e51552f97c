"""Shared test helpers: weights made non-trivial so comparisons test the wiring, not identities."""

import contextlib
import shutil

import pytest
import torch
from torch import nn

from senet.layers import native

HAVE_CC = (cc := native._compiler()) is not None and shutil.which(cc) is not None
needs_kernels = pytest.mark.skipif(not HAVE_CC or native._disabled_by_env(), reason="no C compiler, or SENET_NATIVE=0")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturb_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine terms (eval mode), so a wrong mapping of any BN shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def randomize(module: nn.Module, std: float) -> nn.Module:
    """Every parameter ~ N(0, std) and every BN statistic random (eval mode), so every weight matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return module.eval()


def fake_allocator(monkeypatch) -> list:
    """``senet.allocator.reuse_freed_memory`` replaced by a stand-in that records its calls (the list returned) and
    leaves ``{"applied": True, "why": "test"}`` as the state, this process's allocator untouched."""
    from senet import allocator

    calls = []

    def fake():
        calls.append(1)
        allocator._state = {"applied": True, "why": "test"}
        return dict(allocator._state)

    monkeypatch.setattr(allocator, "_state", {"applied": False, "why": "not asked"})
    monkeypatch.setattr(allocator, "reuse_freed_memory", fake)
    return calls
