"""senet.layers.native: the unit ends of eager inference as C kernels, against the formula in float64 and
against PyTorch's ops; where they must step aside; and how they are built (cached, atomic, optional)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import HAVE_CC, needs_kernels, perturb_bn, torch_threads
from torch import nn

from senet.layers import SqueezeExcite, create_attention, native
from senet.layers.fused import reference_path
from senet.models import CifarResNet, ResNet


def random_bn(ch: int, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(ch, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 3)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
    return bn


def random_se(ch: int, **kw) -> SqueezeExcite:
    se = SqueezeExcite(ch, **kw).eval()
    with torch.no_grad():
        for p in se.parameters():
            p.normal_(0, 0.3)
    return se


def formula(bn, se, c, shortcut=None):
    """relu(bn(c) s + shortcut) (or x s without BN and shortcut) by the paper's equations, in float64."""
    c = c.double()
    x = c if bn is None else F.batch_norm(c, bn.running_mean.double(), bn.running_var.double(),
                                          None if bn.weight is None else bn.weight.double(),
                                          None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
    if se is not None:
        fc1, fc2 = se.fc1, se.fc2
        z = x.mean((2, 3))
        h = F.relu(F.linear(z, fc1.weight.double(), None if fc1.bias is None else fc1.bias.double()))
        s = torch.sigmoid(F.linear(h, fc2.weight.double(), None if fc2.bias is None else fc2.bias.double()))
        x = x * s[:, :, None, None]
    return x if shortcut is None else F.relu(x + shortcut.double())


SHAPES = [(1, 256, 56, 16), (3, 64, 7, 4), (16, 512, 7, 32), (2, 48, 1, 5), (1, 24, 9, 3), (5, 37, 5, 6),
          (1, 40, 5, 20), (1, 600, 3, 48)]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,ch,hw,hidden", SHAPES)
def test_kernels_compute_the_formula(n, ch, hw, hidden, threads):
    # batch 1 and 16, 7x7 and 1x1 maps, channel and hidden counts that are not multiples of the vector width
    # or of four (the products go four or a vector width of rows at a time, with rows of 40 and 20 floats
    # that end part-way through a vector; at batch 1 rows of up to 512 floats are read one after the other,
    # two vectors at a time, and longer ones side by side: 600 and 48), BN with and without affine terms, FCs
    # with and without bias
    with torch_threads(threads):
        for affine, bias in [(True, True), (False, False)]:
            bn, se = random_bn(ch, affine), random_se(ch, hidden=hidden, bias=bias)
            c, sc = torch.randn(n, ch, hw, hw), torch.randn(n, ch, hw, hw)
            with torch.inference_mode():
                got = {"se_unit_end": native.se_unit_end(se, bn, c, sc), "bn_add_relu": native.bn_add_relu(bn, c, sc),
                       "se_scale": native.se_scale(se, c)}
            want = {"se_unit_end": formula(bn, se, c, sc), "bn_add_relu": formula(bn, None, c, sc),
                    "se_scale": formula(None, se, c)}
            for k, y in got.items():
                assert y is not None, k
                assert y.dtype == torch.float32 and y.shape == c.shape
                torch.testing.assert_close(y.double(), want[k], atol=2e-5, rtol=2e-5, msg=k)


@needs_kernels
def test_threads_give_identical_results():
    # each plane's sum and each product row is one thread's work: 1 and 2 threads agree to the bit
    bn, se = random_bn(512), random_se(512, bias=True)
    c, sc = torch.randn(8, 512, 14, 14), torch.randn(8, 512, 14, 14)
    x, g = c.clone().requires_grad_(), torch.randn_like(c)
    out = []
    for t in (1, 2):
        with torch_threads(t):
            with torch.inference_mode():
                end, alone = native.se_unit_end(se, bn, c, sc), native.se_scale(se, c)
            y = se.train()(x)  # the block alone in training: output, dL/dx and the FCs' gradients
            out.append([end, alone, y, *torch.autograd.grad(y, [x, *se.parameters()], g)])
            se.eval()
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("n,ch,hw,hidden", [(16, 256, 24, 8), (8, 515, 25, 33), (11, 1101, 14, 14),
                                             (20, 1101, 7, 7)])
@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_large_enough_to_stream_are_right(n, ch, hw, hidden, threads):
    # outputs of 4-32 MB are written with streaming stores: planes of 576 floats all 16-byte aligned; planes of
    # 625 floats mostly not (those take plain stores); planes of 196 and 49 floats as one flat run of vectors,
    # four and sixteen planes a period, with three and four planes left over; forward (inference and training)
    # and dL/dx
    se = random_se(ch, hidden=hidden, bias=True)
    x = torch.randn(n, ch, hw, hw)
    assert 4 << 20 <= x.numel() * 4 < 32 << 20
    with torch_threads(threads):  # with two, each thread streams its share of whole periods
        with torch.no_grad():
            y = native.se_scale(se, x)
        torch.testing.assert_close(y.double(), formula(None, se, x), atol=2e-5, rtol=2e-5)
        check_training_block(se, x)


def block_grads(se: nn.Module, x: torch.Tensor, g: torch.Tensor, params: list) -> tuple:
    """(y, dL/dx or None, [dL/dp for params]) of se(x) with upstream gradient g."""
    y = se(x)
    wanted = ([x] if x.requires_grad else []) + params
    got = list(torch.autograd.grad(y, wanted, g))
    return y, got.pop(0) if x.requires_grad else None, got


def check_training_block(se: SqueezeExcite, x: torch.Tensor, x_grad: bool = True, param_grad: bool = True,
                         g: torch.Tensor | None = None) -> None:
    """se(x) in training takes the native function and gives float64 autograd's output and gradients."""
    se = se.train()
    for p in se.parameters():
        p.requires_grad_(param_grad)
    x = x.detach().requires_grad_(x_grad)
    g = torch.randn(x.shape) if g is None else g
    params = [p for p in se.parameters() if p.requires_grad]
    y, dx, dps = block_grads(se, x, g, params)
    assert type(y.grad_fn).__name__ == "_SEScaleBackward"
    se64 = copy.deepcopy(se).double()
    for p in se64.parameters():
        p.requires_grad_(param_grad)
    x64 = x.detach().double().requires_grad_(x_grad)
    with reference_path():
        y64, dx64, dps64 = block_grads(se64, x64, g.double(), [p for p in se64.parameters() if p.requires_grad])
    torch.testing.assert_close(y.double(), y64, atol=2e-5, rtol=2e-5)
    assert (dx is None) == (not x_grad) and len(dps) == len(dps64)
    for got, want in zip(([dx] if x_grad else []) + dps, ([dx64] if x_grad else []) + dps64, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item() + 1e-7, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,ch,hw,hidden", SHAPES)
def test_training_block_gives_autograds_gradients(n, ch, hw, hidden, threads):
    # the SE block alone in training: forward and backward each one native call; dL/dx and the FCs'
    # gradients against float64 autograd through the paper's ops, FCs with and without bias
    with torch_threads(threads):
        for bias in (True, False):
            check_training_block(random_se(ch, hidden=hidden, bias=bias), torch.randn(n, ch, hw, hw))


@needs_kernels
def test_training_block_computes_only_the_gradients_asked_for():
    se, x = random_se(40, hidden=6, bias=True), torch.randn(3, 40, 6, 6)
    check_training_block(se, x, x_grad=True, param_grad=False)  # frozen FCs (fine-tuning around them)
    check_training_block(se, x, x_grad=False, param_grad=True)  # the block first on a leaf input
    # a gradient that is not contiguous (the next op transposed the map) is read right
    g = torch.randn(3, 40, 6, 6).transpose(2, 3)
    check_training_block(se, x, g=g)


@needs_kernels
def test_training_block_declines_and_refuses_double_backward():
    se, x = random_se(24, hidden=3, bias=True).train(), torch.randn(2, 24, 5, 5, requires_grad=True)

    def kind(xx, block=se):
        return type(block(xx).grad_fn).__name__

    assert kind(x) == "_SEScaleBackward"
    assert kind(x.double(), copy.deepcopy(se).double()) == "_ScaleByExcitationBackward"
    assert kind(x.to(memory_format=torch.channels_last)) == "_ScaleByExcitationBackward"
    with native.off():
        assert kind(x) == "_ScaleByExcitationBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kind(x) != "_SEScaleBackward"
    assert kind(x, random_se(24, hidden=3, gate="hard_sigmoid").train()) == "_ScaleByExcitationBackward"
    with reference_path():
        assert kind(x) == "MulBackward0"
    with pytest.raises(RuntimeError, match="no second derivatives"):  # a gradient penalty: refused, not wrong
        torch.autograd.grad(se(x).square().sum(), x, create_graph=True)
    h = se.fc2.register_forward_hook(lambda *a: None)
    assert kind(x) != "_SEScaleBackward"
    h.remove()


def inference_and_reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` in inference (where the kernels run) and on the reference path."""
    with torch.inference_mode():
        got = model(x)
        with reference_path():
            return got, model(x)


def se_resnet(block: str = "bottleneck") -> nn.Module:
    if block == "basic":
        return perturb_bn(CifarResNet("basic", 1, attn="se", num_classes=7))
    return perturb_bn(ResNet("bottleneck", [1, 1, 1, 1], attn="se_released", num_classes=7))


@needs_kernels
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("attn", ["se", None])
def test_networks_take_the_kernels_in_eager_inference(block, attn, monkeypatch):
    torch.manual_seed(0)
    if block == "basic":
        model = perturb_bn(CifarResNet("basic", 1, attn=attn, num_classes=7))
        x = torch.randn(3, 3, 32, 32)
    else:
        model = perturb_bn(ResNet("bottleneck", [1, 1, 1, 1], attn=attn and "se_released", num_classes=7))
        x = torch.randn(2, 3, 64, 64)
    calls = []
    for name in ("se_unit_end", "bn_add_relu"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    with torch.inference_mode():
        got = model(x)
        n_units = len(calls)
        with native.off():
            ops = model(x)
        with reference_path():
            ref = model(x)
    units = sum(1 for m in model.modules() if hasattr(m, "_merge"))
    assert n_units == units and set(calls) == {"se_unit_end" if attn else "bn_add_relu"}
    torch.testing.assert_close(got, ops, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref64 = model.double()(x.double())
    err, err_ops = (got.double() - ref64).abs().max(), (ops.double() - ref64).abs().max()
    assert err <= 4 * err_ops + 1e-6  # as close to float64 as PyTorch's float32 ops, give or take rounding


@needs_kernels
def test_the_block_alone_takes_the_kernel_in_inference():
    se = random_se(96, bias=True)
    x = torch.randn(4, 96, 10, 10)
    with torch.no_grad():
        got = se(x)
        with native.off():
            ops = se(x)
    torch.testing.assert_close(got.double(), formula(None, se, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ops, atol=1e-6, rtol=1e-5)


@needs_kernels
def test_a_hooked_conv_keeps_its_output():
    # the result goes into the last conv's output only when nothing else can hold it: a hook on that
    # conv may keep it, so then the unit writes a fresh tensor
    model = se_resnet().eval()
    kept = []
    model.layer1[0].conv3.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))
    out, copy = kept[0]
    assert torch.equal(out, copy)


@needs_kernels
def test_kernels_step_aside_where_they_do_not_apply():
    bn, se = random_bn(32), random_se(32, hidden=4)
    c, sc = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    with torch.inference_mode():
        assert native.se_unit_end(se, bn, c, sc) is not None
        declined = {
            "float64": native.se_unit_end(se, bn, c.double(), sc.double()),
            "channels_last": native.se_unit_end(se, bn, c.to(memory_format=torch.channels_last),
                                                sc.to(memory_format=torch.channels_last)),
            "strided shortcut": native.se_unit_end(se, bn, c, sc.transpose(2, 3)),
            "shortcut of another shape": native.se_unit_end(se, bn, c, sc[:, :, :3]),
            "hard sigmoid gate": native.se_unit_end(random_se(32, hidden=4, gate="hard_sigmoid"), bn, c, sc),
            "1x1-conv FCs": native.se_unit_end(random_se(32, hidden=4, fc="conv"), bn, c, sc),
            "max pooling": native.se_unit_end(random_se(32, hidden=4, pool="max"), bn, c, sc),
            "another SE": native.se_unit_end(create_attention("ese", 32).eval(), bn, c, sc),
            "BN of other width": native.se_unit_end(se, random_bn(16), c, sc),
            "SE of other width": native.se_unit_end(random_se(16, hidden=4), bn, c, sc),
            "BatchNorm subclass": native.bn_add_relu(type("MyBN", (nn.BatchNorm2d,), {})(32).eval(), c, sc),
            "BN without statistics": native.bn_add_relu(nn.BatchNorm2d(32, track_running_stats=False).eval(), c, sc),
            "train-mode BN": native.bn_add_relu(nn.BatchNorm2d(32).train(), c, sc),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            declined["autocast"] = native.se_unit_end(se, bn, c, sc)
        with native.off():
            declined["off()"] = native.se_unit_end(se, bn, c, sc)
        se.fc1.register_forward_hook(lambda *a: None)
        declined["hooked FC"] = native.se_unit_end(se, bn, c, sc)
    assert {k: v for k, v in declined.items() if v is not None} == {}


@needs_kernels
def test_what_the_networks_do_not_hand_to_the_kernels(monkeypatch):
    # training, a hooked BN, train-mode BN under no_grad: PyTorch's ops (and right)
    model = se_resnet()
    results = []

    def spy(*a, _real=native.se_unit_end):
        results.append(_real(*a))
        return results[-1]

    monkeypatch.setattr(native, "se_unit_end", spy)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()  # training: never asked
    assert results == []
    model.eval()
    h = model.layer2[0].bn3.register_forward_hook(lambda *a: None)
    with torch.inference_mode():
        model(x)
    h.remove()
    assert len(results) == 3 and all(r is not None for r in results)  # the three unhooked units
    results.clear()
    model.train()
    with torch.no_grad():
        y = model(x)
    assert len(results) == 4 and all(r is None for r in results)  # asked, declined: BN uses batch statistics
    with reference_path(), torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_serial_build_steps_aside_when_torch_runs_threads(monkeypatch):
    monkeypatch.setitem(native._state, "openmp", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert native._threads() is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert native._threads() == 1


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native as if nothing had been built in this process, caching under tmp_path."""
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "why": "not built yet", "openmp": False,
                                           "path": None})
    monkeypatch.setenv("SENET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SENET_NATIVE", raising=False)
    return tmp_path


@needs_kernels
def test_built_once_then_loaded_from_the_cache(fresh_build, monkeypatch):
    assert native.status()["available"]
    built = sorted((fresh_build / "native").iterdir())
    assert [p.suffix for p in built] == [".so"]  # the library, no sources or partial files left
    runs = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda cmd, **kw: runs.append(cmd) or real_run(cmd, **kw))
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "why": "", "openmp": False, "path": None})
    assert native.status()["path"] == str(built[0])
    assert all("-shared" not in cmd for cmd in runs)  # asked the compiler its version, compiled nothing


def test_no_compiler_means_pytorch_ops_and_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*SENET_NATIVE=0"):
        st = native.status()
    assert not st["available"] and "no-such-cc" in st["why"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        y, ref = inference_and_reference(se_resnet().eval(), torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_a_failed_compile_leaves_nothing_behind(fresh_build, monkeypatch):
    monkeypatch.setattr(native, "SOURCE", native.SOURCE + "\nthis is not C;\n")
    if not HAVE_CC:
        pytest.skip("no C compiler")
    with pytest.warns(RuntimeWarning, match="build failed"):
        assert native.library() is None
    assert list((fresh_build / "native").iterdir()) == []


def test_senet_native_0_turns_them_off(fresh_build, monkeypatch):
    monkeypatch.setenv("SENET_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = native.status()
    assert st == {"available": False, "why": "off: SENET_NATIVE=0", "openmp": False, "path": None}
    with torch.inference_mode():
        assert native.bn_add_relu(random_bn(8), torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)) is None


@needs_kernels
def test_unit_ends_squeeze_through_the_conv_where_that_reads_less(monkeypatch):
    # the squeeze reads the last 1x1 conv's input and weight instead of its output when that reads at least
    # SQUEEZE_THROUGH_CONV_MIN_SAVING elements fewer and the product W mean(h) costs at most 4 MACs per element
    # saved; the result is the reference path's up to float rounding
    model = se_resnet()
    x = torch.randn(8, 3, 64, 64)
    taken, means = [], []
    real = native._through_conv

    def spy(conv, h, c, h_mean=None):
        out = real(conv, h, c, h_mean)
        taken.append(out[0] is h)
        means.append(type(h_mean))
        return out

    monkeypatch.setattr(native, "_through_conv", spy)
    got, ref = inference_and_reference(model, x)
    # c, W per stage (h is not read: its mean comes from bn_relu): 8x256x16x16, 256x64 (saving 507904 elements,
    # 131072 MACs): through; 8x512x8x8, 512x128 (196608, 524288 MACs): through; stage 3: W (262144) outweighs c
    # (131072); stage 4 likewise
    assert taken == [True, True, False, False]
    assert means == [native.Means] * 4  # from bn_relu's pass, as a handle (no tensor made for it)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    taken.clear()
    monkeypatch.setattr(native, "SQUEEZE_THROUGH_CONV_MIN_SAVING", 196609)  # stage 2 saves one element too few
    with torch.inference_mode():
        torch.testing.assert_close(model(x), got, atol=1e-5, rtol=1e-5)
    assert taken == [True, False, False, False]
    taken.clear()
    # without the mean (h must be read too): stage 2 saves 131072 elements, under 196609
    assert native._through_conv(model.layer2[0].conv3, torch.empty(8, 128, 8, 8), torch.empty(8, 512, 8, 8))[0] is None
    # a mean of the wrong shape or dtype counts as none: the same decision as without it (default minimum)
    monkeypatch.setattr(native, "SQUEEZE_THROUGH_CONV_MIN_SAVING", 2**15)
    conv2_3, h2, c2 = model.layer2[0].conv3, torch.empty(8, 128, 8, 8), torch.empty(8, 512, 8, 8)
    assert native._through_conv(conv2_3, h2, c2, torch.zeros(8, 128))[3] is not None
    buf = torch.zeros(2 * 128 + 8 * 128)
    assert native._through_conv(conv2_3, h2, c2, native.Means(buf, 2 * 128, 8, 128))[3] is not None
    for bad in (torch.zeros(8, 64), torch.zeros(8, 128, dtype=torch.float64),  # then h is read (131072 saved)
                native.Means(buf, 2 * 128, 8, 64)):
        route = native._through_conv(conv2_3, h2, c2, bad)
        assert route[0] is h2 and route[3] is None
    taken.clear()
    model.layer1[0].conv3.register_forward_hook(lambda *a: None)  # a hook may change c: no detour
    with torch.inference_mode():
        model(x)
    assert taken[0] is False
    # where the product costs more than the read it saves: ResNet-50's stage 4 at batch 16 (W 2048 x 512;
    # saving 204800 elements for 16.8M MACs) declines; the same conv on 16 x 16 maps (saving 5.2M) takes it
    conv = nn.Conv2d(512, 2048, 1, bias=False)
    for hw, want in [(7, False), (16, True)]:
        h, c = torch.empty(16, 512, hw, hw), torch.empty(16, 2048, hw, hw)
        assert (native._through_conv(conv, h, c)[0] is h) is want


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,ch_in,ch,hw,hidden,conv_bias", [
    (1, 64, 256, 20, 16, False),  # batch 1: one row product per channel
    (3, 37, 150, 9, 6, True),  # widths off the blocking, a conv bias
    (16, 128, 515, 7, 33, True),  # batch >= 2, short rows: the transposed product
    (2, 600, 70, 5, 8, False),  # rows longer than the transposed product takes
])
def test_squeeze_through_the_conv_computes_the_formula(n, ch_in, ch, hw, hidden, conv_bias, threads, monkeypatch):
    # the kernel's detour against float64: h is NOT the input c came from, so the result shows which one the
    # squeeze read: s comes from mean_hw bn(conv(h)), the scale applies to bn(c)
    monkeypatch.setattr(native, "_through_conv", lambda conv, h, c, h_mean=None: (h, conv.weight, conv.bias, h_mean))
    conv, bn, se = nn.Conv2d(ch_in, ch, 1, bias=conv_bias), random_bn(ch), random_se(ch, hidden=hidden, bias=True)
    h, c, sc = torch.randn(n, ch_in, hw, hw), torch.randn(n, ch, hw, hw), torch.randn(n, ch, hw, hw)
    with torch_threads(threads), torch.inference_mode():
        got = native.se_unit_end(se, bn, c, sc, conv_in=(conv, h))
        direct = native.se_unit_end(se, bn, c, sc)
    with torch.no_grad():
        conv_out = F.conv2d(h.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double())
        z = formula(bn, None, conv_out).mean((2, 3))
        fc1, fc2 = se.fc1, se.fc2
        s = torch.sigmoid(F.linear(F.relu(F.linear(z, fc1.weight.double(), fc1.bias.double())),
                                   fc2.weight.double(), fc2.bias.double()))
        want = F.relu(formula(bn, None, c) * s[:, :, None, None] + sc.double())
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(direct.double(), formula(bn, se, c, sc), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(got, direct, atol=1e-3)  # the two squeezes differ: the test tells them apart
    # given mean_hw h (from the pass that wrote h), the kernel reads it and not h: h zeroed, same result
    with torch_threads(threads), torch.inference_mode():
        from_mean = native.se_unit_end(se, bn, c, sc, conv_in=(conv, torch.zeros_like(h)), h_mean=h.mean((2, 3)))
    torch.testing.assert_close(from_mean.double(), want, atol=2e-5, rtol=2e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,ch,hw", [(1, 64, 56), (3, 37, 9), (16, 128, 7), (2, 600, 1)])
@pytest.mark.parametrize("inplace", [False, True])
def test_bn_relu_computes_the_formula(n, ch, hw, inplace, threads):
    # relu(bn(c)) with eval-mode BN, and mean_hw of it per (b, c), against float64
    bn = random_bn(ch)
    c = torch.randn(n, ch, hw, hw)
    c_before = c.clone()
    with torch_threads(threads), torch.inference_mode():
        y, mean = native.bn_relu(bn, c, inplace=inplace, mean=True)
        y_only, no_mean = native.bn_relu(bn, c_before.clone())
    want = F.relu(formula(bn, None, c_before))
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    # the means come as a handle (no tensor made between two convolutions); its tensor is the memory it points to
    assert type(mean) is native.Means and mean.shape == (n, ch) and mean.tensor().data_ptr() == mean.data_ptr()
    torch.testing.assert_close(mean.tensor().double(), want.mean((2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_only, y, atol=0, rtol=0)
    assert no_mean is None
    assert (y is c) is inplace and (inplace or torch.equal(c, c_before))


@needs_kernels
def test_bn_relu_steps_aside_where_it_does_not_apply():
    bn, c = random_bn(32), torch.randn(2, 32, 6, 6)
    with torch.inference_mode():
        assert native.bn_relu(bn, c) is not None
        declined = {
            "float64": native.bn_relu(bn.double(), c.double()),
            "channels_last": native.bn_relu(bn.float(), c.to(memory_format=torch.channels_last)),
            "BN of other width": native.bn_relu(random_bn(16), c),
            "BatchNorm subclass": native.bn_relu(type("MyBN", (nn.BatchNorm2d,), {})(32).eval(), c),
            "BN without statistics": native.bn_relu(nn.BatchNorm2d(32, track_running_stats=False).eval(), c),
            "train-mode BN": native.bn_relu(nn.BatchNorm2d(32).train(), c),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            declined["autocast"] = native.bn_relu(bn, c)
        with native.off():
            declined["off()"] = native.bn_relu(bn, c)
    assert {k: v for k, v in declined.items() if v is not None} == {}


@needs_kernels
@pytest.mark.parametrize("hooked", [None, "bn2", "act", "conv2"])
def test_units_fuse_bn_and_relu_where_nobody_watches(hooked, monkeypatch):
    # eager inference: BN + ReLU after the first two convs in one pass (the 3x3's with the mean for the SE
    # end); a hook on BN or the ReLU keeps the modules' calls; a hook on the conv keeps its output intact
    model = se_resnet()
    calls = []
    real = native.bn_relu
    monkeypatch.setattr(native, "bn_relu", lambda *a: calls.append(a[3]) or real(*a))
    unit = model.layer1[0]
    seen = []
    if hooked == "conv2":
        unit.conv2.register_forward_hook(lambda m, i, o: seen.append((o, o.clone())))
    elif hooked is not None:
        getattr(unit, hooked).register_forward_hook(lambda m, i, o: seen.append(1))
    got, ref = inference_and_reference(model, torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the mean flag of each call: the stem's, then (bn1, bn2) per unit; layer1's hooked BN or ReLU leaves its
    # calls to the modules
    want = {None: [False, True] * 4, "conv2": [False, True] * 4, "bn2": [False] + [False, True] * 3,
            "act": [False, True] * 3}[hooked]
    assert calls == [False, *want]
    if hooked == "conv2":  # fused into a fresh tensor: the hook's output is left as it was
        out, copy = seen[0]
        assert torch.equal(out, copy)
