"""senet export: parity with the eager model for one model per family, GlobalAveragePool in the ONNX graph."""

import json
import tempfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from senet.cli import main
from senet.export import export_model, load_spec, onnx_session, rewrite_global_pools, temp_onnx_session
from senet.layers import attention_blocks
from senet.models import CifarResNet, ResNet, create_model

# One small model per family (extend as families land): name, kwargs, input size, a gate op it must keep.
FAMILIES = [
    ("se_resnet20", {}, (3, 16, 16), "Sigmoid"),  # CIFAR ResNet
    # pre-activation CIFAR units (the family of preact_resnet110/wrn16_8, 2 units per stage to stay
    # shallow: 110 random layers amplify float32 rounding to ~1e-4), hard-sigmoid gate
    ("preact", {"attn": "se_mobilenetv3"}, (3, 8, 8), "HardSigmoid"),
    # ImageNet ResNets (se_resnet18 / eca_resnet50 layouts, one unit per stage: full depth is slow to build)
    ("imagenet_basic", {"attn": "se_released", "num_classes": 7}, (3, 32, 32), "Sigmoid"),
    ("imagenet_bottleneck", {"attn": "eca", "num_classes": 5}, (3, 32, 32), "Sigmoid"),
    # the other families at small inputs; SE in MobileNetV3's torchvision slot, not at `attn`
    ("mobilenet_v3_small", {"num_classes": 5}, (3, 32, 32), "HardSigmoid"),
    ("se_mobilenet_v2", {"num_classes": 5}, (3, 32, 32), "Sigmoid"),
    ("se_shufflenet_v1_g3", {"num_classes": 5}, (3, 32, 32), "Sigmoid"),
    ("se_bninception", {"num_classes": 5}, (3, 64, 64), "Sigmoid"),
]


def _eval_model(name, kwargs):
    if name == "preact":
        model = CifarResNet("basic", 2, preact=True, shortcut="B", **kwargs).eval()
    elif name.startswith("imagenet_"):
        model = ResNet(name.removeprefix("imagenet_"), [1, 1, 1, 1], **kwargs).eval()
    else:
        model = create_model(name, **kwargs).eval()
    for m in model.modules():  # non-trivial BN statistics so parity is not checked on near-zero logits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name,kwargs,size,gate", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_onnx_parity_and_global_pool(tmp_path, name, kwargs, size, gate):
    model = _eval_model(name, kwargs)
    path = tmp_path / "m.onnx"
    report = export_model(model, path, "onnx", size, dynamic_batch=True, exporter="torchscript", opset=17)
    assert report.ok and report.max_abs_diff <= 1e-4 and report.batch_sizes == [2, 3]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "ReduceMean" not in ops
    # every squeeze and the head's pooling is a GlobalAveragePool (ECA's and SE's squeeze + 1 head)
    assert ops.count("GlobalAveragePool") == len(attention_blocks(model)) + 1
    assert gate in ops
    # dynamic batch: a batch size never seen at export time, checked against eager here
    x = torch.randn(5, *size)
    sess = onnx_session(path, threads=1)
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=0)


def test_dynamo_exporter_opset18_axes_input(tmp_path):
    # opset 18 passes ReduceMean's axes as an input, not an attribute: the rewrite must read both forms
    model = CifarResNet("basic", 1, attn="se").eval()
    report = export_model(model, tmp_path / "d.onnx", "onnx", (3, 8, 8), opset=18, exporter="dynamo")
    assert report.ok
    assert "ReduceMean" not in report.onnx_ops and report.onnx_ops["GlobalAveragePool"] == 3 + 1


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torchscript_and_pt2_parity(tmp_path, fmt):
    model = _eval_model("se_resnet20", {"attn": "se_mobilenetv3"})
    report = export_model(model, tmp_path / f"m.{fmt}", fmt, (3, 8, 8), dynamic_batch=True)
    assert report.ok and report.batch_sizes == [2, 3]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.x: torch.jit.script is deprecated
@pytest.mark.parametrize("what", ["network", "attention_block", "user_cnn"])
def test_torch_jit_script_names_what_works(what):
    # scripting used to fail deep in the TorchScript compiler ("Unknown type name 'nn.Module'" in
    # senet/layers/fused.py, "import statements aren't supported"): now one error that names the way out,
    # for our networks, every attention block, and a user's own CNN holding one of our blocks
    from senet.layers import create_attention, list_attentions

    if what == "network":
        cases = [create_model("se_resnet20"), create_model("mobilenet_v3_small")]
    elif what == "attention_block":
        cases = [create_attention(name, 32) for name in list_attentions()]
    else:
        cases = [torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), create_attention("se", 32))]
    for model in cases:
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile senet's .*torch\.jit\.trace"):
            torch.jit.script(model.eval())
    # what the error recommends works: trace the first case and compare
    model = cases[0].eval()
    x = torch.randn(2, 3, 16, 16) if what != "attention_block" else torch.randn(2, 32, 8, 8)
    with torch.inference_mode():
        expected = model(x)
    traced = torch.jit.trace(model, x, check_trace=False)
    with torch.inference_mode():
        torch.testing.assert_close(traced(x), expected)


def _reduce_graph(axes, keepdims, opset):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = []
    if opset >= 18:
        inits = [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)]
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=keepdims)
    graph = helper.make_graph([node], "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_rewrite_reduce_mean_forms(tmp_path, opset, keepdims):
    model = _reduce_graph([2, 3] if keepdims else [-2, -1], keepdims, opset)
    assert rewrite_global_pools(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["GlobalAveragePool"] if keepdims else ["GlobalAveragePool", "Flatten"])
    assert not model.graph.initializer  # the now unused axes tensor is dropped
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(tmp_path / "r.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    got = onnx_session(tmp_path / "r.onnx", threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x.mean((2, 3), keepdims=bool(keepdims)), atol=1e-6)


def test_onnx_session_writes_the_optimized_graph(tmp_path):
    model = _reduce_graph([2, 3], 1, 13)
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(tmp_path / "r.onnx"))
    onnx_session(tmp_path / "r.onnx", threads=1, optimized_path=tmp_path / "opt.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["ReduceMean"]


def test_temp_onnx_session_runs_the_model_and_leaves_no_files(tmp_path, monkeypatch):
    # benchmarks open one of these per run: its ~2x model-size files must not pile up in the temp directory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = create_model("se_resnet20").eval()
    sess, ops = temp_onnx_session(model, (3, 8, 8), threads=1, optimized_ops=True)
    assert list(tmp_path.iterdir()) == []
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], want, atol=1e-4)
    assert ops and sum(ops.values()) > 0 and all(":" in k for k in ops)
    assert temp_onnx_session(model, (3, 8, 8), threads=1)[1] is None
    assert list(tmp_path.iterdir()) == []


def test_rewrite_leaves_other_reductions():
    model = _reduce_graph([1], 1, 13)  # a channel mean is not a global pool
    assert rewrite_global_pools(model) == 0
    assert [n.op_type for n in model.graph.node] == ["ReduceMean"]


def test_cli_export_writes_file_and_report(tmp_path, capsys):
    out = tmp_path / "se.onnx"
    assert main(["export", "se_resnet20", "--exporter", "torchscript", "--opset", "17", "--res", "8",
                 "--out", str(out)]) == 0
    assert out.is_file() and "OK" in capsys.readouterr().out
    report = json.loads((tmp_path / "se.onnx.json").read_text())
    assert report["report"]["max_abs_diff"] <= 1e-4 and report["git_revision"] is not None
    assert report["versions"]["torch"] == torch.__version__


def test_cli_export_rejects_unknown_model(capsys):
    assert main(["export", "no_such_net"]) == 2
    assert "neither a file nor a registered model" in capsys.readouterr().err


def test_load_spec_name_input_size():
    loaded = load_spec("se_resnet20")
    assert loaded.input_size == (3, 32, 32) and loaded.checkpoint is None
