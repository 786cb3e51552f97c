"""senet: Squeeze-and-Excitation channel attention, its family, and the networks built with them."""

from importlib.metadata import PackageNotFoundError, version

from .hub import create_model, load_model  # create_model(name, checkpoint=...); load_model(path): any checkpoint
from .layers import create_attention, list_attentions
from .models import freeze, list_models
from .surgery import attach, load_attached, load_base_model, save_attached

try:
    __version__ = version("senet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__", "attach", "create_attention", "create_model", "freeze", "list_attentions", "list_models",
    "load_attached", "load_base_model", "load_model", "save_attached",
]
