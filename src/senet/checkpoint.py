"""senet's own checkpoint format: a ``.safetensors`` file with a JSON header in its metadata.

The safetensors ``metadata`` (a str -> str dict) holds one entry, ``"senet"``, a JSON object:

    {"format": "senet", "format_version": 1,
     "arch": "se_resnet50", "model_kwargs": {...}, "num_classes": 1000,
     "provenance": {"senet": ..., "torch": ..., "git_revision": ..., "created": ..., "source": ...},
     "extra": {...}}                      # whatever the caller stored (training state, config, ...)

so ``senet.load_model(path)`` can rebuild the network from the file alone. Tensors are plain
safetensors: any safetensors reader can load the weights, and loading never unpickles code.
Writes are atomic (``senet.provenance.atomic_write_bytes``: temp file in the same directory, fsync,
``os.replace``): a kill mid-save leaves the previous file, never a half-written one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from senet.provenance import atomic_write_bytes, git_revision, now, versions

FORMAT = "senet"
FORMAT_VERSION = 1
_META_KEY = "senet"  # the one safetensors metadata entry holding the JSON header


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    arch: str,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    source: str | None = None,
) -> Path:
    """Write ``model``'s state dict and a header naming ``arch(**model_kwargs)`` to ``path``.

    ``extra`` is any JSON-serialisable dict stored verbatim under ``header["extra"]``; ``source``
    says where the weights came from (e.g. ``"timm:seresnet50 converted from x.pth"``).
    Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"senet checkpoints are .safetensors files, got {str(path)!r}; "
                         f"name it {path.with_suffix('.safetensors').name!r}")
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    header = make_header(arch, model_kwargs or {}, tensors, extra=extra, source=source)
    blob = save(tensors, metadata={_META_KEY: json.dumps(header)})
    atomic_write_bytes(path, blob)
    return path


def make_header(arch: str, model_kwargs: dict[str, Any], state: Mapping[str, torch.Tensor], *,
                extra: dict[str, Any] | None = None, source: str | None = None) -> dict[str, Any]:
    """The JSON header of a senet checkpoint (raises ValueError if kwargs/extra are not JSON)."""
    v = versions()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "model_kwargs": model_kwargs,
        "num_classes": model_kwargs.get("num_classes", _head_classes(state)),
        "provenance": {"senet": v["senet"], "torch": v["torch"], "git_revision": git_revision(), "created": now(),
                       "source": source},
        "extra": extra or {},
    }
    try:
        json.dumps(header)
    except TypeError as err:
        raise ValueError(f"checkpoint header must be JSON-serialisable ({err}); "
                         "pass plain numbers/strings/lists/dicts in model_kwargs and extra") from None
    return header


def _head_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    # (num_classes, num_features): the classifier senet's networks name `fc`.
    weight = state.get("fc.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def read_header(path: str | Path) -> dict[str, Any] | None:
    """The senet header of a ``.safetensors`` file, or None if it has none (a foreign file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err})") from None
    if _META_KEY not in meta:
        return None
    header = json.loads(meta[_META_KEY])
    _check_header(header, path)
    return header


def _check_header(header: dict[str, Any], path: str | Path) -> None:
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r}: metadata 'senet' has format {header.get('format')!r}, "
                         "expected 'senet'")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has senet format_version {version!r}; this senet reads up to "
                         f"{FORMAT_VERSION}: upgrade senet to load it")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, header)`` of a senet checkpoint; ValueError if ``path`` is not one."""
    header = require_header(path)
    return load_file(str(path)), header


def require_header(path: str | Path) -> dict[str, Any]:
    """The senet header of ``path``; FileNotFoundError / ValueError naming the fix if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    header = read_header(path)
    if header is None:
        raise ValueError(f"{str(path)!r} is a safetensors file without a senet header; load it with "
                         "senet.create_model(name, checkpoint=PATH) or convert it with `senet convert`")
    return header


def training_config(header: dict[str, Any]) -> dict[str, Any]:
    """The training config a checkpoint header carries: ``extra["train"]["config"]`` (where `senet train`
    puts it) or ``extra["config"]``, else {}."""
    extra = header.get("extra") or {}
    return (extra.get("train") or {}).get("config") or extra.get("config") or {}


def data_settings(header: dict[str, Any], data: str | None = None, root: str | None = None,
                  image_size: int | None = None) -> tuple[str, str | None, int | None]:
    """``(data, root, image_size)`` to evaluate a checkpoint on: the caller's where given, else what its
    training config recorded, else digits at the data set's default size. The recorded root is used
    only for the recorded data set."""
    stored = {k: v for k, v in training_config(header).items() if v is not None}
    data = data or stored.get("data", "digits")
    root = root or (stored.get("root") if data == stored.get("data") else None)
    return data, root, image_size or stored.get("image_size")


def build_from_checkpoint(path: str | Path, **overrides: Any) -> nn.Module:
    """The network the file's header describes with its weights loaded: ``senet.load_model`` (which also
    rebuilds attached and pruned networks), in train mode as built.

    ``overrides`` replace model kwargs that do not change parameter shapes (e.g. ``drop_rate``).
    """
    from senet.hub import load_model

    require_header(path)  # a file without a senet header is an error here, not a layout to detect
    return load_model(path, **overrides).train()
