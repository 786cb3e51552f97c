"""senet.freeze: the frozen snapshot gives the eager model's outputs bit for bit, runs its units from plans
(where they apply), and steps aside, or follows, where its contract says."""

import copy
import io

import pytest
import torch
from helpers import needs_kernels, perturb_bn, torch_threads
from torch import nn

import senet
from senet.layers import native
from senet.layers.fused import reference_path
from senet.models import CifarResNet, FrozenResNet, ResNet, create_model, freeze
from senet.models import frozen as frozen_mod


@pytest.fixture(autouse=True)
def one_thread():
    # the kernels run one thread unless built with OpenMP; with more, eager and frozen both use PyTorch's ops
    with torch_threads(1):
        yield


@pytest.fixture
def plan_calls(monkeypatch):
    """How many times a unit ran from its plan."""
    calls = []
    call = frozen_mod._UnitPlan.__call__
    monkeypatch.setattr(frozen_mod._UnitPlan, "__call__", lambda self, x, nt: calls.append(self) or call(self, x, nt))
    return calls


def small(name: str = "se_resnet50", **kw) -> nn.Module:
    torch.manual_seed(0)
    return perturb_bn(create_model(name, num_classes=10, **kw))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@needs_kernels
@pytest.mark.parametrize("name, planned", [("se_resnet50", 16), ("resnet50", 16), ("se_resnet18", 8),
                                           ("resnet18", 8), ("se_resnext50_32x4d", 16), ("legacy_se_resnet50", 16)])
@pytest.mark.parametrize("batch, res", [(1, 64), (16, 32)])  # batch 16: the squeeze through conv3 at stages 1-3
def test_frozen_gives_the_eager_outputs_bit_for_bit(name, planned, batch, res, plan_calls):
    model = small(name)
    frozen = freeze(model)
    assert isinstance(frozen, FrozenResNet) and frozen.planned == planned and not frozen.training
    x = torch.randn(batch, 3, res, res)
    want = run(model, x)
    assert torch.equal(run(frozen, x), want)
    assert len(plan_calls) == planned  # every planned unit ran from its plan
    with reference_path(), native.off():  # and against PyTorch's unfused ops, independently of the kernels
        torch.testing.assert_close(run(model, x), want, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_the_plans_run_and_the_modules_do_not():
    # a plan calls no module of its unit: a forward pre-hook counts the convolutions that ran as modules
    model = small("se_resnet18")
    frozen = freeze(model)
    called = []
    for m in frozen.model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args: called.append(mod))  # after freezing: not seen
    x = torch.randn(2, 3, 32, 32)
    out = run(frozen, x)
    assert len(called) == 1 and called[0] is frozen.model.conv1  # the stem only: it is not planned
    assert torch.equal(out, run(model, x))


@needs_kernels
def test_units_that_cannot_be_planned_keep_their_forward():
    model = small("se_resnet18")
    model.layer2[0].bn1.register_forward_hook(lambda m, i, o: o * 2)  # hooked before freezing: that unit runs eagerly
    frozen = freeze(model)
    assert frozen.planned == 7
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(run(frozen, x), run(model, x))
    eca = freeze(small("eca_resnet50"))  # another attention block: every unit eager, same outputs
    assert eca.planned == 0
    assert torch.equal(run(eca, x), run(eca.model, x))
    mixed = small("resnet18", attn="se", attn_stages=[2, 4], attn_placement="standard")
    assert freeze(mixed).planned == 8 and torch.equal(run(freeze(mixed), x), run(mixed, x))
    post = small("resnet18", attn="se", attn_placement="post")
    assert freeze(post).planned == 0 and torch.equal(run(freeze(post), x), run(post, x))


@needs_kernels
def test_hooks_on_a_stage_or_the_network_still_fire():
    x = torch.randn(2, 3, 32, 32)
    model = small("se_resnet18")
    fired = []
    model.layer2.register_forward_hook(lambda m, i, o: fired.append("layer2"))
    frozen = freeze(model)
    assert frozen.planned == 6  # layer2's two units run as their stage
    assert torch.equal(run(frozen, x), run(model, x)) and fired == ["layer2", "layer2"]
    model = small("se_resnet18")
    model.register_forward_pre_hook(lambda m, args: fired.append("net"))
    frozen = freeze(model)
    assert frozen.planned == 0 and torch.equal(run(frozen, x), run(model, x)) and fired[-2:] == ["net", "net"]


@needs_kernels
def test_features_only():
    model = small("se_resnet50", features_only=True)
    x = torch.randn(1, 3, 64, 64)
    got, want = run(freeze(model), x), run(model, x)
    assert len(got) == 4 and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def cifar(**kw) -> CifarResNet:
    torch.manual_seed(0)
    return perturb_bn(CifarResNet(**kw))


@needs_kernels
@pytest.mark.parametrize("kw, planned", [
    ({"block": "basic", "blocks": 2, "attn": "se"}, 6),  # option A shortcuts at stages 2-3 (planned too)
    ({"block": "basic", "blocks": 2}, 6),
    ({"block": "basic", "blocks": 1, "shortcut": "B", "attn": "se", "widen": 2}, 3),  # 1x1 conv + BN shortcuts
    ({"block": "bottleneck", "blocks": 1, "attn": "se"}, 3),
    ({"block": "basic", "blocks": 1, "preact": True, "attn": "se"}, 0),  # pre-activation units: eager
    ({"block": "bottleneck", "blocks": 1, "preact": True, "shortcut": "B", "attn": "se"}, 0),
])
@pytest.mark.parametrize("batch", [1, 16])
def test_cifar_resnets_bit_for_bit(kw, planned, batch, plan_calls):
    model = cifar(**kw)
    frozen = freeze(model)
    assert frozen.planned == planned
    x = torch.randn(batch, 3, 32, 32)
    assert torch.equal(run(frozen, x), run(model, x)) and len(plan_calls) == planned
    feats = cifar(**kw, features_only=True)  # the last stage's map after bn_final + ReLU when pre-activation
    got, want = run(freeze(feats), x), run(feats, x)
    assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    if kw.get("preact"):
        assert want[2].min() >= 0  # forward_end ran: ReLU'd


@needs_kernels
def test_the_registrys_cifar_se_resnets_are_planned():
    for name, planned in (("se_resnet20", 9), ("resnet20", 9), ("se_preact_resnet110", 0)):
        assert freeze(create_model(name)).planned == planned


@needs_kernels
def test_a_snapshot_leaves_the_model_and_does_not_follow_it():
    model = small("se_resnet18")
    x = torch.randn(2, 3, 32, 32)
    before = run(model, x)
    frozen = freeze(model)
    assert frozen.model is not model
    assert model.layer1[0].conv1.weight.data_ptr() != frozen.model.layer1[0].conv1.weight.data_ptr()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.layer1[0].attn.fc1.weight.mul_(2.0)
    assert torch.equal(run(frozen, x), before)
    trained = small("se_resnet18").train()
    frozen = freeze(trained)
    assert trained.training  # freezing copies: the caller's model is not put in eval mode
    assert frozen.planned == 8  # planned in eval mode (the plans read BN's running statistics)
    fresh = freeze(create_model("se_resnet50"))  # as built: training mode
    assert fresh.planned == 16 and torch.equal(run(fresh, x), run(fresh.model, x))


@needs_kernels
def test_training_mode_and_back(plan_calls):
    frozen = freeze(small("se_resnet18"))
    frozen.train()
    assert frozen.planned == 0 and frozen.model.training
    frozen.eval()  # planned again
    x = torch.randn(2, 3, 32, 32)
    assert frozen.planned == 8 and torch.equal(run(frozen, x), run(frozen.model, x)) and len(plan_calls) == 8


@needs_kernels
def test_where_it_steps_aside_it_is_the_snapshots_eager_forward(plan_calls):
    model = small("se_resnet18")
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    want = run(model, x)
    out = frozen(x)  # autograd on: the eager path (its training functions), with a graph
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(frozen, x.to(memory_format=torch.channels_last)),
                       run(model, x.to(memory_format=torch.channels_last)))
    with native.off():
        assert torch.equal(run(frozen, x), run(model, x))
    with reference_path():
        assert torch.equal(run(frozen, x), run(model, x))
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
    try:
        # a global hook sees every module called; with it the eager units take PyTorch's ops (equal up to rounding)
        torch.testing.assert_close(run(frozen, x), want, rtol=1e-4, atol=1e-4)
        assert nn.Conv2d in seen
    finally:
        handle.remove()
    traced = torch.jit.trace(frozen, x, check_trace=False)  # traced: plain ops, so equal up to rounding
    torch.testing.assert_close(run(traced, x), want, rtol=1e-4, atol=1e-4)
    assert plan_calls == []  # none of these ran a plan
    assert torch.equal(run(frozen, x), want) and len(plan_calls) == frozen.planned


@needs_kernels
def test_changes_made_through_the_frozen_model_are_followed():
    model = small("se_resnet18")
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    double = copy.deepcopy(frozen).double()  # _apply plans again (here: no plan applies to float64 weights)
    assert double.planned == 0 and torch.equal(run(double, x.double()), run(copy.deepcopy(model).double(), x.double()))
    other = small("se_resnet18")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    frozen.load_state_dict(freeze(other).state_dict())  # copied into the tensors the plans read
    assert torch.equal(run(frozen, x), run(other, x))
    frozen.load_state_dict(freeze(model).state_dict(), assign=True)  # new tensors: planned again
    assert frozen.planned == 8 and torch.equal(run(frozen, x), run(model, x))
    frozen.train()  # training mode: batch statistics, the eager forward
    with torch.no_grad():
        assert torch.equal(frozen(x), copy.deepcopy(model).train()(x))


@needs_kernels
def test_copies_plan_their_own_tensors():
    model = small("se_resnet18")
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    want = run(model, x)
    twin = copy.deepcopy(frozen)
    del frozen  # the copy must not read the original's memory
    assert torch.equal(run(twin, x), want)
    plan = twin._stages[0][0]
    assert plan.se[0] == twin.model.layer1[0].attn.fc1.weight.data_ptr()
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own object, just written
    assert loaded.planned == 8 and torch.equal(run(loaded, x), want)


def test_the_state_dict_is_the_models_key_for_key():
    model = small("se_resnet18")
    frozen = freeze(model)
    want = model.state_dict()
    got = frozen.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert set(got._metadata) == set(want._metadata)  # the version records too (BN's reads them on loading)
    x = torch.randn(2, 3, 32, 32)
    plain = small("se_resnet18")
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(0.5)
    assert plain.load_state_dict(got) is not None and torch.equal(run(plain, x), run(model, x))  # frozen -> model
    refrozen = freeze(plain)
    trained = small("se_resnet18")
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5)
    refrozen.load_state_dict(trained.state_dict())  # model -> frozen: into the tensors the plans read
    assert torch.equal(run(refrozen, x), run(trained, x)) and refrozen.planned == 8
    refrozen.load_state_dict({"model." + k: v for k, v in want.items()})  # the wrapper's own keys still load
    assert torch.equal(run(refrozen, x), run(model, x))
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\) in state_dict: "fc.bias".*Unexpected key\(s\) in '
                                           r'state_dict: "head.w"'):
        refrozen.load_state_dict({**{k: v for k, v in want.items() if k != "fc.bias"}, "head.w": torch.ones(1)})
    wrong = {**want, "layer1.0.conv1.weight": torch.ones(3), "fc.bias": "zeros"}
    with pytest.raises(RuntimeError) as err:  # the errors torch's modules add name the model's keys as well
        refrozen.load_state_dict(wrong)
    assert "size mismatch for layer1.0.conv1.weight:" in str(err.value) and "model." not in str(err.value)
    assert 'the parameter named "fc.bias"' in str(err.value)
    assert torch.equal(run(refrozen, x), run(model, x)) and refrozen.planned == 8  # the rest loaded, still planned

    class Holder(nn.Module):  # inside another module the keys carry that module's prefix, as the model's would
        def __init__(self, net):
            super().__init__()
            self.net, self.head = net, nn.Linear(10, 2)

    held = Holder(freeze(model)).state_dict()
    assert list(held) == list(Holder(model).state_dict())
    other = Holder(freeze(plain))
    other.load_state_dict(held)
    assert torch.equal(run(other.net, x), run(model, x))
    with pytest.raises(RuntimeError, match=r"size mismatch for net\.fc\.weight: ") as err:
        other.load_state_dict({**held, "net.fc.weight": torch.ones(2)})
    assert "model." not in str(err.value)
    del held["net.fc.bias"]
    assert other.load_state_dict(held, strict=False).missing_keys == ["net.fc.bias"]


def test_without_the_kernels_nothing_is_planned(monkeypatch):
    monkeypatch.setattr(frozen_mod.native, "library", lambda: None)
    model = small("se_resnet18")
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    assert frozen.planned == 0 and torch.equal(run(frozen, x), run(model, x))


def test_what_it_refuses_names_the_fix():
    with pytest.raises(TypeError, match="ResNet-family.*got VGG"):
        freeze(create_model("se_vgg16", num_classes=10))
    with pytest.raises(ValueError, match=r"model.cpu\(\)"):
        freeze(ResNet("basic", [1, 1, 1, 1], attn="se", num_classes=10).to("meta"))
    assert senet.freeze is freeze
