"""`senet paper-table`: our ResNets/ResNeXts with and without SE against the SENet paper, and
the other families (VGG, Inception, MobileNet, ShuffleNet; ``family_rows``, Tables 2-3).

Regenerates docs/paper_table.md: parameters and GMACs of one 224x224 forward pass against SENet
(Hu et al., arXiv 1709.01507) Table 2, whose "GFLOPs" are multiply-accumulates. MACs follow
``senet.flops`` (conv + linear layers, SE FCs included; BN, activations, pooling, element-wise
excluded). Parameters are checked against the exact counts users check (REFERENCE.md) or, where the
paper gives none, against torchvision's (plain) and timm's Caffe ports (SE) of the same network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import senet
from senet.flops import count_macs, count_params
from senet.models import create_model

# (network, our model, kwargs, paper GMACs (Table 2), exact params (REFERENCE.md) or None, param source)
# ResNets: stride in the first 1x1, as the paper's Caffe models. ResNeXts: stride in the 3x3, as the
# ResNeXt paper and the released SE-ResNeXts.
_ROWS = [
    ("ResNet-50", "resnet50", {"stride_in_1x1": True}, 3.86, 25_557_032, ("torchvision", "resnet50")),
    ("SE-ResNet-50", "legacy_se_resnet50", {}, 3.87, 28_088_024, ("timm", "legacy_seresnet50")),
    ("ResNet-101", "resnet101", {"stride_in_1x1": True}, 7.58, None, ("torchvision", "resnet101")),
    ("SE-ResNet-101", "legacy_se_resnet101", {}, 7.60, None, ("timm", "legacy_seresnet101")),
    ("ResNet-152", "resnet152", {"stride_in_1x1": True}, 11.30, None, ("torchvision", "resnet152")),
    ("SE-ResNet-152", "legacy_se_resnet152", {}, 11.32, None, ("timm", "legacy_seresnet152")),
    ("ResNeXt-50 (32x4d)", "resnext50_32x4d", {}, 4.24, None, ("torchvision", "resnext50_32x4d")),
    ("SE-ResNeXt-50 (32x4d)", "legacy_se_resnext50_32x4d", {}, 4.25, 27_559_896,
     ("timm", "legacy_seresnext50_32x4d")),
    ("ResNeXt-101 (32x4d)", "resnext101_32x4d", {}, 7.99, None, ("timm", "resnext101_32x4d")),
    ("SE-ResNeXt-101 (32x4d)", "legacy_se_resnext101_32x4d", {}, 8.00, None, ("timm", "legacy_seresnext101_32x4d")),
]

TOLERANCE = 0.01  # the "within 1%"

# The other families (models/vgg.py, inception.py, mobilenet.py, shufflenet.py), SENet Tables 2-3:
# (network, our model, input size, paper GMACs, paper params (Table 3, rounded to 0.1M) or None,
#  reference network for the parameters or None, why a row cannot match or "").
_IRV2_WHY = ("not matched: ours is the TF-slim network of the released weights, equal to timm's "
             "`inception_resnet_v2` (same params, same 13.156 G with this counter); the paper does not describe "
             "its variant. The SE increment (+0.0085 G) matches the paper's +0.01")
_SHUFFLE_WHY = ("not matched: the official ShuffleNet-Series release lists this network at 137.46M FLOPs (MACs) "
                "and 1.86M parameters, ours exactly; with the shortcut 3x3 average pools and residual additions "
                "(2.17M ops, excluded here) it is 139.6M, the paper's rounded 140M")
_FAMILY_ROWS = [
    ("VGG-16 (with BN)", "vgg16_bn", 224, 15.47, None, ("torchvision", "vgg16_bn"), ""),
    ("SE-VGG-16 (with BN)", "se_vgg16_bn", 224, 15.48, None, None, ""),
    ("BN-Inception", "bninception", 224, 2.03, None, None, ""),
    ("SE-BN-Inception", "se_bninception", 224, 2.04, None, None, ""),
    ("Inception-ResNet-v2 (299x299)", "inception_resnet_v2", 299, 11.75, None, ("timm", "inception_resnet_v2"),
     _IRV2_WHY),
    ("SE-Inception-ResNet-v2 (299x299)", "se_inception_resnet_v2", 299, 11.76, None, None, _IRV2_WHY),
    ("MobileNet 1.0-224 (Table 3)", "mobilenet_v1", 224, 0.569, 4.2, None, ""),
    ("SE-MobileNet 1.0-224 (Table 3)", "se_mobilenet_v1", 224, 0.572, 4.7, None, ""),
    ("ShuffleNet 1x g=3 (Table 3)", "shufflenet_v1_g3", 224, 0.140, 1.8, None, _SHUFFLE_WHY),
    ("SE-ShuffleNet 1x g=3 (Table 3)", "se_shufflenet_v1_g3", 224, 0.142, 2.4, None,
     "not matched: the base network's count above (official 137.46M) plus SE's FCs (+0.61M MACs); SE adds "
     "0.61M parameters, the paper's 1.8M -> 2.4M"),
]


def _reference_params(exact: int | None, source: tuple[str, str]) -> tuple[int | None, str]:
    if exact is not None:
        return exact, "REFERENCE.md, exact"
    lib, name = source
    try:
        module = __import__(lib)
        with torch.device("meta"):
            model = module.create_model(name) if lib == "timm" else getattr(module.models, name)()
    except (ImportError, AttributeError, RuntimeError):
        return None, f"{lib} {name} (not installed)"
    return count_params(model), f"{lib} `{name}`"


def _meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def paper_rows() -> list[dict]:
    """One dict per network: ours vs the paper, with the stride-in-3x3 MACs for comparison."""
    rows = []
    for network, name, kwargs, paper_gmacs, exact, source in _ROWS:
        model = _meta_model(name, **kwargs)
        ref_params, ref_source = _reference_params(exact, source)
        in_1x1 = model.layer2[0].conv1.stride[0] == 2  # where the first unit of stage 2 strides
        other = {**kwargs, "stride_in_1x1": not in_1x1}
        rows.append({
            "network": network,
            "model": name + "".join(f", {k}={v}" for k, v in kwargs.items()),
            "params": count_params(model),
            "ref_params": ref_params,
            "ref_source": ref_source,
            "gmacs": count_macs(model, device="meta") / 1e9,
            "paper_gmacs": paper_gmacs,
            "stride_in_1x1": in_1x1,
            "other_gmacs": count_macs(_meta_model(name, **other), device="meta") / 1e9,
        })
    for r in rows:
        r["ratio"] = r["gmacs"] / r["paper_gmacs"]
        r["ok"] = abs(r["ratio"] - 1) <= TOLERANCE and (r["ref_params"] in (None, r["params"]))
    return rows + family_rows()


def family_rows() -> list[dict]:
    """VGG, Inception, MobileNet and ShuffleNet rows; a row that cannot match carries its reason."""
    rows = []
    for network, name, size, paper_gmacs, paper_m, source, why in _FAMILY_ROWS:
        model = _meta_model(name)
        params = count_params(model)
        if paper_m is not None:
            ref, ref_source = int(paper_m * 1e6), "SENet Table 3, rounded to 0.1M"
            params_ok = abs(params / ref - 1) <= TOLERANCE
        else:
            ref, ref_source = _reference_params(None, source) if source else (None, "")
            params_ok = ref in (None, params)
        gmacs = count_macs(model, (3, size, size), device="meta") / 1e9
        ratio = gmacs / paper_gmacs
        rows.append({"network": network, "model": name, "params": params, "ref_params": ref,
                     "ref_source": ref_source, "gmacs": gmacs, "paper_gmacs": paper_gmacs, "ratio": ratio,
                     "ok": abs(ratio - 1) <= TOLERANCE and params_ok, "explained": why,
                     "note": why or _FAMILY_NOTES[name]})
    return rows


_FAMILY_NOTES = {
    "vgg16_bn": "torchvision layout",
    "se_vgg16_bn": "SE (r=16, bias-free Linear) after each block's last conv + ReLU: +2C^2/16 per block",
    "bninception": "Caffe release widths (4c: 608 channels), ceil-mode pools",
    "se_bninception": "SE after every Inception module (Fig. 2), FC biases as the Caffe release",
    "mobilenet_v1": "MobileNets Table 1 (569M MACs, 4.2M parameters there too)",
    "se_mobilenet_v1": "SE after each depthwise-separable block; +0.48M parameters",
}


def _note(r: dict) -> str:
    if "note" in r:  # family_rows()
        return r["note"]
    where = "1x1 (Caffe, the paper's)" if r["stride_in_1x1"] else "3x3 (ResNeXt paper, released SE-ResNeXt)"
    other = "3x3" if r["stride_in_1x1"] else "1x1"
    note = f"stride in {where}; stride in the {other} would give {r['other_gmacs']:.2f}"
    if r["network"].startswith("SE-"):
        note += ("; SE adds only its FCs' MACs here (element-wise ops excluded), the paper's +0.01-0.02 "
                 "presumably also counts SE's pooling and scaling")
    return note


def render(rows: list[dict]) -> str:
    lines = [
        "# Our networks vs the SENet paper (arXiv 1709.01507, Tables 2 and 3)",
        "",
        "Generated by `senet paper-table` (src/senet/papertable.py); do not edit by hand.",
        f"senet {senet.__version__}, torch {torch.__version__}. GMACs: one 224x224 image (299x299 for",
        "Inception-ResNet-v2); MACs of conv and",
        "linear layers (SE FCs included), excluding BN, activations, pooling and element-wise ops",
        "(`senet.flops`). The paper's \"GFLOPs\" are MACs. \"ok\": GMACs within 1% of the paper and",
        "parameters equal to the reference (within 1% of Table 3's rounded counts); \"no\": cannot match,",
        "the last column says why.",
        "",
        "| network | ours | params | reference params | GMACs | paper GMACs | ratio | ok | convention |",
        "|---|---|---:|---|---:|---:|---:|:-:|---|",
    ]
    for r in rows:
        ref = "n/a" if r["ref_params"] is None else f"{r['ref_params']:,} ({r['ref_source']})"
        lines.append(
            f"| {r['network']} | `{r['model']}` | {r['params']:,} | {ref} | {r['gmacs']:.3f} | "
            f"{r['paper_gmacs']:.{3 if r['paper_gmacs'] < 1 else 2}f} | {r['ratio']:.4f} | {_verdict(r)} | {_note(r)} |"
        )
    return "\n".join(lines) + "\n"


def _verdict(r: dict) -> str:
    return "yes" if r["ok"] else "no" if r.get("explained") else "NO"


def _paper_table(args: argparse.Namespace) -> int:
    rows = paper_rows()
    text = render(rows)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: {sum(r['ok'] for r in rows)}/{len(rows)} rows within 1% of the paper")
    return 0 if all(r["ok"] or r.get("explained") for r in rows) else 1


def add_parser(sub) -> None:
    p = sub.add_parser("paper-table", help="regenerate docs/paper_table.md: params and MACs vs the SENet paper")
    p.add_argument("--out", default="docs/paper_table.md", help="output Markdown file, or - for stdout")
    p.set_defaults(func=_paper_table)
