"""Weight initialization, as PyTorch / torchvision do it.

Arrays are drawn on the host from the shared generator (backend.rng()) and then
moved to the active backend, so a seed gives the same weights on NumPy and CuPy.
"""
import math

import numpy

from .. import backend


def kaiming_normal(shape, fan, dtype=numpy.float32):
    """N(0, 2 / fan): keeps the variance of ReLU activations (He et al. 2015).

    torchvision's ResNet uses fan = fan_out = out_channels * kh * kw for convs.
    """
    std = math.sqrt(2.0 / fan)
    return backend.to_device(backend.rng().normal(0.0, std, size=shape), dtype)


def uniform(shape, bound, dtype=numpy.float32):
    """U(-bound, bound): PyTorch's default for Linear weights and all biases,
    with bound = 1 / sqrt(fan_in)."""
    return backend.to_device(backend.rng().uniform(-bound, bound, size=shape), dtype)


def constant(shape, value, dtype=numpy.float32):
    return backend.to_device(numpy.full(shape, value), dtype)
