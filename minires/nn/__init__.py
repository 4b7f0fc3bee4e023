"""Layers as modules: PyTorch-shaped, with explicit ``backward``."""
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .container import Sequential
from .conv import Conv2d
from .linear import Flatten, Linear
from .loss import CrossEntropyLoss
from .module import Module
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d

__all__ = [
    "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "Flatten",
    "Linear", "MaxPool2d", "Module", "ReLU", "Sequential",
]
