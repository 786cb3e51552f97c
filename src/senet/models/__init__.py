"""Networks built from senet.layers, and the registry that names them. Imports nothing but layers."""

from . import cifar, inception, mobilenet, resnet, shufflenet, vgg  # noqa: F401  (importing registers their models)
from .cifar import CifarResNet
from .registry import ModelInfo, create_model, list_models, model_info, register_model
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock", "Bottleneck", "CifarResNet", "ModelInfo", "ResNet", "create_model", "list_models",
    "model_info", "register_model",
]
