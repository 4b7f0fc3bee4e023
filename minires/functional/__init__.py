"""Pure ops: each ``*_forward(...) -> (out, cache)`` and ``*_backward(dout, cache) -> grads``.

One file per family. Where the fast path is not already the formula itself
(convolution, BatchNorm, pooling, the loss, Linear's forward), a loop-based
``*_naive`` reference reads like the math and is tested equal to it.
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
from .residual import add_backward, add_forward
