"""senet's max pooling (``senet.layers.pool.MaxPool2d``, ``native.max_pool2d``): PyTorch's values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from test_native import needs_kernels, torch_threads
from torch import nn

from senet import create_model
from senet.layers import native
from senet.layers.fused import reference_path
from senet.layers.pool import MaxPool2d

# (kernel, stride, padding, ceil_mode): ResNet's stem, the Caffe stem and Inception's reductions, VGG's, a
# stride-1 pooling (Inception's branch), and uneven ones
GEOMETRIES = [(3, 2, 1, False), (3, 2, 0, True), (3, 2, 0, False), (2, 2, 0, False), (3, 1, 1, False),
              (5, 3, 2, True), (3, 2, 1, True), ((3, 2), (2, 1), (1, 0), False), ((1, 4), (1, 3), 0, True)]
SIZES = [(112, 112), (7, 9), (2, 5), (13, 6), (1, 4)]


def tricky(n: int, ch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A ReLU's output (many tied zeros), with a NaN, two NaNs in one window, -inf and -0.0 planted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ch, h, w, generator=g).relu()
    x[0, 0, 0, 0] = float("nan")
    if h * w >= 4:
        x[-1, -1, :2, :2] = torch.tensor([[float("nan"), 1.0], [float("nan"), 2.0]])[: min(h, 2), : min(w, 2)]
    x[-1, 0, -1, -1] = float("-inf")
    x[0, -1, h // 2, w // 2] = -0.0
    return x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    return (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))


def counted(monkeypatch) -> list:
    """Record what ``native.max_pool2d`` returned on each call (None: it stepped aside)."""
    calls, real = [], native.max_pool2d
    monkeypatch.setattr(native, "max_pool2d", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_max_pooling_gives_pytorchs_values_and_gradients(geometry, size, threads, monkeypatch):
    k, s, p, ceil = geometry
    x = tricky(2, 3, *size)
    ours, theirs = MaxPool2d(k, s, p, ceil_mode=ceil), nn.MaxPool2d(k, s, p, ceil_mode=ceil)
    try:
        want = theirs(x)
    except RuntimeError:  # the window does not fit: PyTorch refuses, and so does ours (below)
        with pytest.raises(RuntimeError):
            ours(x)
        return
    calls = counted(monkeypatch)
    with torch_threads(threads):
        with torch.no_grad():
            got = ours(x)
        xg = x.clone().requires_grad_()
        y = ours(xg)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g)
    assert len(calls) == 2 and all(c is not None for c in calls)  # the kernel ran, forward and in training
    assert same(got, want) and same(y.detach(), want)
    xr = x.clone().requires_grad_()
    theirs(xr).backward(g)
    assert torch.equal(xg.grad, xr.grad)  # the gradient at the same positions: ties, NaNs and edges included


@needs_kernels
def test_max_pooling_by_hand():
    # one 4 x 5 plane, 2 x 2 windows at stride 2, ceil mode: the last column is a window of its own
    x = torch.tensor([[[[1.0, 3.0, 0.0, 0.0, -1.0],
                        [3.0, 2.0, 0.0, 0.0, -2.0],
                        [float("nan"), 5.0, 4.0, 9.0, float("-inf")],
                        [6.0, float("nan"), 9.0, 1.0, float("-inf")]]]], requires_grad=True)
    pool = MaxPool2d(2, 2, ceil_mode=True)
    y = pool(x)
    want = torch.tensor([[[[3.0, 0.0, -1.0], [float("nan"), 9.0, float("-inf")]]]])
    assert same(y.detach(), want)
    y.backward(torch.tensor([[[[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]]]))
    # first maximum in row-major order (the 3 at (0, 1), the 0 at (0, 2), the 9 at (2, 3)); the last NaN; a
    # window of -inf: its first element
    grad = torch.zeros(4, 5)
    grad[0, 1], grad[0, 2], grad[0, 4], grad[3, 1], grad[2, 3], grad[2, 4] = 10, 20, 30, 40, 50, 60
    assert torch.equal(x.grad[0, 0], grad)


@needs_kernels
def test_overlapping_windows_add_up_their_gradients():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # in all four 3 x 3 windows at stride 2; with padding 1, in one of nine
    for padding, windows, hits in [(0, 4, 4), (1, 9, 1)]:
        xg = x.clone().requires_grad_()
        y = MaxPool2d(3, 2, padding)(xg)
        assert y.numel() == windows
        y.sum().backward()
        assert xg.grad[0, 0, 2, 2] == hits and xg.grad.sum() == windows  # windows without it: their first zero


@needs_kernels
@pytest.mark.parametrize("case", ["dilation", "indices", "float64", "channels_last", "unbatched", "empty",
                                  "reference_path", "native_off"])
def test_max_pooling_steps_aside_where_the_kernel_does_not_apply(case, monkeypatch):
    kw = {"dilation": 2} if case == "dilation" else {"return_indices": True} if case == "indices" else {}
    ours, theirs = MaxPool2d(3, 2, 1, **kw), nn.MaxPool2d(3, 2, 1, **kw)
    x = tricky(2, 4, 11, 10)
    if case == "float64":
        x = x.double()
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "unbatched":
        x = x[0]
    elif case == "empty":
        x = x[:0]
    calls = counted(monkeypatch)
    with reference_path() if case == "reference_path" else native.off() if case == "native_off" else torch.no_grad():
        got, want = ours(x), theirs(x)
    if case == "indices":
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    assert same(got, want)
    assert all(c is None for c in calls)


@needs_kernels
def test_max_pooling_refuses_what_pytorch_refuses():
    x = torch.randn(1, 2, 8, 8)
    for pool in [MaxPool2d(3, 2, 2), MaxPool2d(9, 1, 0)]:  # padding over half the kernel; a window over the input
        with pytest.raises(RuntimeError) as ours:
            pool(x)
        with pytest.raises(RuntimeError) as theirs:
            F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding)
        assert str(ours.value) == str(theirs.value)


@needs_kernels
def test_max_pooling_in_training_refuses_double_backward_and_keeps_its_positions():
    x = tricky(2, 3, 9, 9).requires_grad_()
    y = MaxPool2d(3, 2, 1)(x * 1)
    with pytest.raises(RuntimeError, match="create_graph"):  # double backward: refused, never wrong
        torch.autograd.grad(y.sum(), x, create_graph=True)
    # the input changed after forward: the gradient still goes to forward's maxima (PyTorch's pooling keeps the
    # input and refuses instead; senet's keeps only the positions, one byte per output)
    h, hr = x * 1, x * 1
    y, yr = MaxPool2d(3, 2, 1)(h), nn.MaxPool2d(3, 2, 1)(hr)
    with torch.no_grad():
        h.mul_(-1)
    g = torch.randn(y.shape)
    (got,) = torch.autograd.grad(y, x, g)
    (want,) = torch.autograd.grad(yr, x, g)
    assert torch.equal(got, want)


@needs_kernels
def test_backward_may_run_on_another_thread_count():
    x = tricky(4, 8, 30, 30)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch_threads(1):
        y = MaxPool2d(3, 2, 1)(xg)
    with torch_threads(2):
        y.sum().backward()
    nn.MaxPool2d(3, 2, 1)(xr).sum().backward()
    assert torch.equal(xg.grad, xr.grad)


@needs_kernels
def test_hooks_see_the_kernels_result():
    pool, seen = MaxPool2d(3, 2, 1), []
    pool.register_forward_hook(lambda m, i, o: seen.append(o))
    x = tricky(1, 2, 8, 8)
    with torch.no_grad():
        y = pool(x)
    assert seen and seen[0] is y and same(y, F.max_pool2d(x, 3, 2, 1))


def test_traced_and_exported_code_keeps_pytorchs_pooling():
    pool = MaxPool2d(3, 2, 1)
    x = torch.randn(1, 2, 8, 8)
    traced = torch.jit.trace(pool, x)
    assert "max_pool2d" in str(traced.graph) and torch.equal(traced(x), pool(x))
    program = torch.export.export(pool, (x,))
    assert "max_pool2d" in str(program.graph)


def test_the_networks_pool_with_it():
    model = create_model("resnet50")
    assert type(model.maxpool) is MaxPool2d and isinstance(model.maxpool, nn.MaxPool2d)
    assert not any("maxpool" in k for k in model.state_dict())  # checkpoints unchanged: pooling has no state
    for name in ["se_vgg16", "se_bninception", "se_inception_resnet_v2", "se_shufflenet_v1_g3", "legacy_se_resnet50"]:
        model = create_model(name)
        pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
        assert pools and all(type(m) is MaxPool2d for m in pools), name
