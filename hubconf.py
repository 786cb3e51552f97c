"""torch.hub entry points: every registered senet model, by name.

    model = torch.hub.load("/path/to/senet", "se_resnet50", source="local", num_classes=10)

Nothing is downloaded: models come with fresh weights (load your own with senet.create_model's
``checkpoint=``). The source tree's ``src/`` is put on the path so an uninstalled clone works too.
"""

import os
import sys

dependencies = ["torch"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from senet.models import create_model, list_models  # noqa: E402


def _entrypoint(name: str):
    def build(**kwargs):
        return create_model(name, **kwargs)

    build.__name__, build.__doc__ = name, f"senet.create_model({name!r}, **kwargs)"
    return build


globals().update({_name: _entrypoint(_name) for _name in list_models()})
