"""Networks built from senet.layers, and the registry that names them. Imports nothing but layers."""

from . import resnet  # noqa: F401  (registers the ImageNet ResNet family)
from .registry import ModelInfo, create_model, list_models, model_info, register_model
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock", "Bottleneck", "ModelInfo", "ResNet", "create_model", "list_models", "model_info",
    "register_model",
]
