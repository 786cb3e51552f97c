"""The `senet` command: a thin shell that hands each subcommand to its tool module.

Each module listed in ``_COMMANDS`` defines ``add_parser(subparsers)``, which registers its
subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Tool modules providing subcommands, in the order `senet --help` lists them.
_COMMANDS = [
    "senet.info",
    "senet.papertable",
    "senet.train",
    "senet.evaluate",
    "senet.compare",
    "senet.convert",
    "senet.bench",
    "senet.export",
    "senet.analyze",
    "senet.prune",
]


class UserError(Exception):
    """A mistake we can name: printed as one line, exit code 2, no traceback."""


def parse_kwargs(items: list[str], flag: str = "--model-arg") -> dict:
    """``["attn=eca", "attn_kwargs={\"k\": 3}"]`` -> dict for a repeatable ``flag KEY=VALUE``; values are
    parsed as JSON when they are JSON (numbers, booleans, lists, objects), else kept as strings."""
    import json

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    from senet import __version__

    parser = argparse.ArgumentParser(prog="senet", description=__doc__.splitlines()[0].rstrip("."))
    parser.add_argument("--version", action="version", version=f"senet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).add_parser(sub)
    # no prefix matching: `senet train --model X` (timm's spelling; the model is positional here) would
    # otherwise be read as --model-arg and fail with a message about KEY=VALUE
    for p in (parser, *sub.choices.values()):
        p.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = ""
        if "--model" in extra and hasattr(args, "model"):
            hint = f"; the model is positional: `senet {args.command} NAME` (e.g. `senet {args.command} se_resnet50`)"
        elif isinstance(getattr(args, "models", None), str) and not extra[0].startswith("-"):
            hint = f"; --models takes one comma-separated list: --models {','.join([args.models, *extra])}"
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"senet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
