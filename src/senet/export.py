"""`senet export`: write a network as ONNX, TorchScript or a torch.export program (``.pt2``) and check
that the written file reproduces the eager logits (max |difference| <= 1e-4) right after writing it.

Global average pooling (the SE squeeze, eq. 2 of Hu et al., arXiv 1709.01507, and the classifier's
pooling) is written as ONNX ``GlobalAveragePool``: PyTorch exports ``x.mean((2, 3))`` as
``ReduceMean`` over axes [2, 3], which some runtimes (and accelerators' compilers) do not treat as
global pooling. ``rewrite_global_pools`` rewrites the graph after export; the blocks stay unchanged.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMATS = ("onnx", "torchscript", "pt2")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
TOLERANCE = 1e-4  # max |logit difference| accepted between the eager model and the exported file


# ----------------------------------------------------------------------------- loading a model


@dataclass
class LoadedModel:
    """A network and what the tools need to know about it."""

    model: nn.Module
    arch: str
    model_kwargs: dict
    input_size: tuple[int, int, int]  # (C, H, W) it expects
    checkpoint: str | None = None
    header: dict = field(default_factory=dict)


def load_spec(spec: str, **model_kwargs) -> LoadedModel:
    """``spec`` is a registered model name (random weights) or a checkpoint path (``senet.load_model``:
    plain, attached, pruned or foreign).

    The input size is the checkpoint's training image size when it recorded one, else the size its
    attach calls probed with, else the registry's (3x224x224 for a network senet does not register).
    """
    from senet.models import create_model, list_models

    path = Path(spec)
    if path.suffix == ".safetensors" or path.exists():
        from senet.hub import load_model

        model = load_model(path, **model_kwargs)
        header = model.senet_header
        return LoadedModel(model, model.arch_name, model.arch_kwargs,
                           _input_size(model.arch_name, model.arch_kwargs, header), str(path), header)
    if spec not in list_models():
        raise ValueError(f"{spec!r} is neither a file nor a registered model; pass a senet .safetensors "
                         "checkpoint or a name from `senet models`")
    model = create_model(spec, **model_kwargs).eval()
    return LoadedModel(model, spec, dict(model_kwargs), _input_size(spec, model_kwargs, {}))


def _input_size(arch: str, kwargs: dict, header: dict) -> tuple[int, int, int]:
    from senet.checkpoint import training_config
    from senet.models import list_models, model_info

    steps = ((header.get("extra") or {}).get("attach") or {}).get("steps")
    if steps:
        c, h, w = steps[0]["input_size"]
    else:
        c, h, w = model_info(arch).input_size if arch in list_models() else (3, 224, 224)
    size = training_config(header).get("image_size")
    return (kwargs.get("in_chans", c), size or h, size or w)


# ----------------------------------------------------------------------------- ONNX graph rewrite


def _axes(node, constants: dict[str, np.ndarray]) -> list[int] | None:
    """The reduction axes of a Reduce* node: an attribute up to opset 17, the 2nd input from 18."""
    import onnx

    for attr in node.attribute:
        if attr.name == "axes":
            return list(onnx.helper.get_attribute_value(attr))
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in constants[node.input[1]].reshape(-1)]
    return None


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _ranks(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    infos = [*g.value_info, *g.input, *g.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


_GLOBAL = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}


def rewrite_global_pools(model) -> int:
    """Replace ``ReduceMean``/``ReduceMax`` over axes [2, 3] of a 4D tensor by ``GlobalAveragePool`` /
    ``GlobalMaxPool`` (followed by ``Flatten`` when ``keepdims=0``), in place. Returns the count."""
    import onnx

    graph = model.graph
    constants, ranks = _constants(graph), _ranks(model)
    nodes, count = [], 0
    for node in graph.node:
        axes = _axes(node, constants) if node.op_type in _GLOBAL else None
        rank = ranks.get(node.input[0]) if axes is not None else None
        if rank != 4 or sorted(a % 4 for a in axes) != [2, 3]:
            nodes.append(node)
            continue
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        pooled = node.output[0] if keep else node.output[0] + "_pooled"
        nodes.append(onnx.helper.make_node(_GLOBAL[node.op_type], [node.input[0]], [pooled], name=node.name))
        if not keep:  # (B, C, 1, 1) -> (B, C)
            nodes.append(onnx.helper.make_node("Flatten", [pooled], [node.output[0]], axis=1,
                                               name=node.name + "_flatten"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return count


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ----------------------------------------------------------------------------- writers


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
                 exporter: str) -> None:
    import onnx

    kw = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        if exporter == "dynamo":
            dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dyn, verbose=False, **kw)
            proto = prog.model_proto
        else:
            dyn = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            tmp = path.with_name(path.name + ".raw")
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, dynamic_axes=dyn, **kw)
            proto = onnx.load(str(tmp))
            tmp.unlink()
    rewrite_global_pools(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still what C++ users load
        torch.jit.save(torch.jit.trace(model, x), str(path))


def _export_pt2(model: nn.Module, x: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dyn), str(path))


def onnx_session(path: str | Path, threads: int | None = None, *, optimized_path: str | Path | None = None):
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads, default torch's);
    ``optimized_path``: also write the graph onnxruntime runs after its optimizations there."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
        opts.log_severity_level = 3  # its warning that the saved graph is specific to this CPU
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_exported(path: str | Path, fmt: str):
    """A callable ``x (torch.Tensor) -> logits (torch.Tensor)`` running the written file."""
    if fmt == "onnx":
        sess = onnx_session(path)
        name = sess.get_inputs()[0].name
        return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    return torch.export.load(str(path)).module()


# ----------------------------------------------------------------------------- export + parity


@dataclass
class ExportReport:
    path: str
    format: str
    max_abs_diff: float  # over every batch size checked
    batch_sizes: list[int]
    tolerance: float = TOLERANCE
    onnx_ops: dict[str, int] = field(default_factory=dict)  # op type -> count (ONNX only)
    global_pools_rewritten: int = 0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def export_model(model: nn.Module, path: str | Path, fmt: str, input_size: tuple[int, int, int], *,
                 dynamic_batch: bool = False, opset: int = 18, exporter: str = "dynamo",
                 seed: int = 0) -> ExportReport:
    """Write ``model`` (CPU, eval mode) to ``path`` as ``fmt`` and compare the file's logits with the eager
    model's on random inputs: batch 2, and batch 3 as well with ``dynamic_batch``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *input_size, generator=gen)  # batch 2: torch.export specialises a batch of 1
    if fmt == "onnx":
        _export_onnx(model, x, path, opset, dynamic_batch, exporter)
    elif fmt == "torchscript":
        _export_torchscript(model, x, path)
    else:
        _export_pt2(model, x, path, dynamic_batch)
    return _parity(model, path, fmt, input_size, [2, 3] if dynamic_batch else [2], gen)


def _parity(model: nn.Module, path: Path, fmt: str, input_size, batches: list[int], gen) -> ExportReport:
    run = run_exported(path, fmt)
    worst = 0.0
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, *input_size, generator=gen)
            worst = max(worst, (run(x).float() - model(x).float()).abs().max().item())
    report = ExportReport(str(path), fmt, worst, batches)
    if fmt == "onnx":
        report.onnx_ops = onnx_op_counts(path)
    return report


def onnx_op_counts(path: str | Path, *, domains: bool = False) -> dict[str, int]:
    """Node counts per op type of an ONNX file (keys ``domain:op`` with ``domains``: on the graph onnxruntime
    saved after its optimizations they show its own fused and blocked-layout ops)."""
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        key = f"{node.domain or 'ai.onnx'}:{node.op_type}" if domains else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items()))


def temp_onnx_session(model: nn.Module, input_size, *, threads: int | None = None, dynamic_batch: bool = True,
                      optimized_ops: bool = False):
    """An onnxruntime session on ``model`` exported to ONNX (checked against eager first), for benchmarks.

    The files live in a temporary directory that is removed before returning (onnxruntime holds the graph in
    memory), so repeated benchmarks leave nothing behind. Returns ``(session, ops)``: ``ops`` are the node counts
    of the graph onnxruntime runs after its optimizations with ``optimized_ops``, else None."""
    with tempfile.TemporaryDirectory(prefix="senet-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        report = export_model(model, path, "onnx", input_size, dynamic_batch=dynamic_batch, exporter="torchscript",
                              opset=17)
        if not report.ok:
            raise ValueError(f"ONNX export differs from the eager model by {report.max_abs_diff:.2e} "
                             f"(> {report.tolerance}); not benchmarking a wrong graph")
        optimized = path.with_suffix(".optimized.onnx") if optimized_ops else None
        sess = onnx_session(path, threads, optimized_path=optimized)
        ops = onnx_op_counts(optimized, domains=True) if optimized else None
    return sess, ops


# ----------------------------------------------------------------------------- `senet export`


def _command(args: argparse.Namespace) -> int:
    from senet.provenance import provenance, write_json

    loaded = load_spec(args.model)
    size = (loaded.input_size[0], args.res or loaded.input_size[1], args.res or loaded.input_size[2])
    stem = Path(args.model).name.removesuffix(".safetensors")
    out = Path(args.out) if args.out else Path(f"{stem}{_SUFFIX[args.format]}")
    report = export_model(loaded.model, out, args.format, size, dynamic_batch=args.dynamic_batch,
                          opset=args.opset, exporter=args.exporter)
    verdict = "OK" if report.ok else "MISMATCH"
    print(f"wrote {out} ({args.format}, input {tuple(size)}, "
          f"{'dynamic' if args.dynamic_batch else 'fixed'} batch)")
    print(f"parity vs eager on batch {report.batch_sizes}: max |diff| {report.max_abs_diff:.2e} "
          f"(tolerance {report.tolerance:g}) {verdict}")
    if report.onnx_ops:
        print("ONNX ops: " + ", ".join(f"{k} {v}" for k, v in report.onnx_ops.items()))
    config = {"model": args.model, "arch": loaded.arch, "format": args.format, "input_size": size,
              "dynamic_batch": args.dynamic_batch, "opset": args.opset, "exporter": args.exporter}
    write_json(out.with_name(out.name + ".json"), {**provenance(config, "cpu"), "report": asdict(report)})
    return 0 if report.ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write ONNX / TorchScript / torch.export (.pt2) and check its outputs")
    p.add_argument("model", help="a senet .safetensors checkpoint or a registered model name")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--dynamic-batch", action="store_true", help="batch dimension free (checked at 2 and 3)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="ONNX exporter: torch.export-based (default) or the legacy TorchScript one (faster)")
    p.add_argument("--res", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--out", default=None, help="output file (default: <model><suffix> here)")
    p.set_defaults(func=_command)
