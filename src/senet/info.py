"""`senet attentions`: what is registered, one line each."""

from __future__ import annotations

import argparse

from senet.layers import describe_attention, list_attentions


def attention_table() -> list[str]:
    rows = [describe_attention(n) for n in list_attentions()]
    w = max(len(r["name"]) for r in rows)
    return [f"{r['name']:<{w}}  {r['summary']}  [{r['paper']}, arXiv {r['arxiv']}]" for r in rows]


def _attentions(args: argparse.Namespace) -> int:
    print("\n".join(attention_table()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("attentions", help="list every registered attention block")
    p.set_defaults(func=_attentions)
