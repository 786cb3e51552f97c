"""`senet attentions` and `senet models`: what is registered, one line each."""

from __future__ import annotations

import argparse

from senet.flops import profile_model
from senet.layers import describe_attention, list_attentions
from senet.models import list_models


def attention_table() -> list[str]:
    rows = [describe_attention(n) for n in list_attentions()]
    w = max(len(r["name"]) for r in rows)
    return [f"{r['name']:<{w}}  {r['summary']}  [{r['paper']}, arXiv {r['arxiv']}]" for r in rows]


def _attentions(args: argparse.Namespace) -> int:
    print("\n".join(attention_table()))
    return 0


def model_table(pattern: str | None = None) -> list[str]:
    """One line per registered model: name, parameters, GMACs at its default input size, paper."""
    names = list_models(pattern)
    if not names:
        raise ValueError(f"no model matches {pattern!r}; try a shell pattern such as 'se_*' or '*resnet50'")
    rows = [profile_model(n) for n in names]
    w = max(len(r["name"]) for r in rows)
    lines = [f"{'name':<{w}}  {'params':>12}  {'GMACs':>7}  {'input':<11}  paper"]
    for r in rows:
        size = "x".join(map(str, r["input_size"]))
        lines.append(f"{r['name']:<{w}}  {r['params']:>12,}  {r['macs'] / 1e9:>7.3f}  {size:<11}  {r['paper']}")
    return lines


def _models(args: argparse.Namespace) -> int:
    print("\n".join(model_table(args.pattern)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("attentions", help="list every registered attention block")
    p.set_defaults(func=_attentions)
    p = sub.add_parser("models", help="list registered models: parameters, MACs (conv + linear), paper")
    p.add_argument("--pattern", help="shell pattern on the names, e.g. 'se_*' or '*resnet50'")
    p.set_defaults(func=_models)
