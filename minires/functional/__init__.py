"""The textbook: every op, forward and backward, as plain vectorized code.

Each ``*_forward(...) -> (out, cache)`` and ``*_backward(dout, cache) -> grads``,
written once against the array module ``xp`` (NumPy or CuPy), with the math
in its module's docstring and the derivation in docs/backward/. One file per
family; where the vectorized code is not the formula itself (convolution,
BatchNorm, pooling, the loss, Linear's forward), a loop-based ``*_naive``
reference beside it reads like the math and is tested equal to it.
"""
from .activation import relu_backward, relu_forward
from .batchnorm import (
    batchnorm2d_backward,
    batchnorm2d_backward_naive,
    batchnorm2d_forward,
    batchnorm2d_forward_naive,
)
from .conv import (
    col2im,
    conv2d_backward,
    conv2d_backward_naive,
    conv2d_forward,
    conv2d_forward_naive,
    im2col,
)
from .linear import flatten_backward, flatten_forward, linear_backward, linear_forward, linear_forward_naive
from .loss import (
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
    softmax_cross_entropy_forward_naive,
)
from .pooling import (
    avgpool2d_backward,
    avgpool2d_backward_naive,
    avgpool2d_forward,
    avgpool2d_forward_naive,
    global_avgpool_backward,
    global_avgpool_forward,
    maxpool2d_backward,
    maxpool2d_backward_naive,
    maxpool2d_forward,
    maxpool2d_forward_naive,
)
from .optim import all_finite, sgd_step, zero_grads
from .residual import add_backward, add_forward
