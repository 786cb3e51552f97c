"""Module surgery behind ``senet.attach``: put attention into a network a user already has.

    model, report = senet.attach(torchvision.models.resnet50(), "se", where="residual")

The package is named ``surgery`` so that ``senet.attach`` can be the function itself.

See ``_core`` for how blocks are inserted and identity-initialised, ``_rules`` for the placement
rules, and ``_io`` for rebuilding an attached model from a senet checkpoint.
"""

from ._core import INITS, AttachReport, GatedExcitation, Place, attach, attached_blocks, gates
from ._io import (
    adapt_stem,
    attach_record,
    load_attached,
    load_base_model,
    load_weights,
    rebuild_attached,
    save_attached,
)
from ._rules import RESIDUAL_ENDS, RULES

__all__ = ["INITS", "RESIDUAL_ENDS", "RULES", "AttachReport", "GatedExcitation", "Place", "adapt_stem", "attach",
           "attach_record", "attached_blocks", "gates", "load_attached", "load_base_model", "load_weights",
           "rebuild_attached", "save_attached"]
