"""Networks built from senet.layers, and the registry that names them. Imports nothing but layers."""

from . import cifar, inception, mobilenet, resnet, shufflenet, vgg  # noqa: F401  (importing registers their models)
from .cifar import CifarResNet
from .frozen import FrozenResNet, freeze
from .registry import ModelInfo, create_model, list_models, model_info, register_model
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock", "Bottleneck", "CifarResNet", "FrozenResNet", "ModelInfo", "ResNet", "create_model", "freeze",
    "list_models", "model_info", "register_model",
]
