"""Conv2d module: the conv2d op through the seam (minires/ops.py); math in minires/functional/conv.py."""
import math

from .. import ops
from . import init
from .module import Module, check_sizes


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv2d(Module):
    """2-D convolution: x (N, C_in, H, W) -> (N, C_out, Ho, Wo).

    weight (C_out, C_in, kh, kw), Kaiming-normal with fan_out as torchvision's
    ResNet; bias (C_out,) uniform in +-1/sqrt(fan_in) as PyTorch.

    ``input_grad`` (default True): False makes ``backward`` skip dx and return
    None, for a layer whose input is the data (``ResNet.backward`` sets it on
    its first convolution when asked not to return the images' gradient).
    """

    input_grad = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        check_sizes("Conv2d", in_channels=in_channels, out_channels=out_channels,
                    kernel_size=kernel_size, stride=stride)
        check_sizes("Conv2d", minimum=0, padding=padding)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        kh, kw = self.kernel_size
        self.add_param("weight", init.kaiming_normal((out_channels, in_channels, kh, kw), fan=out_channels * kh * kw))
        if bias:
            self.add_param("bias", init.uniform((out_channels,), 1 / math.sqrt(in_channels * kh * kw)))

    def forward(self, x):
        w = self.params["weight"]
        self.check_input(x, (None, self.in_channels, None, None), w.dtype)
        self.check_window(x, self.kernel_size, self.padding)
        out, self.cache = ops.conv2d_forward(x, w, self.params.get("bias"), self.stride, self.padding)
        return out

    def backward(self, dout):
        dx, dw, db = ops.conv2d_backward(dout, self.pop_cache(), input_grad=self.input_grad)
        self.grads["weight"] += dw
        if db is not None:
            self.grads["bias"] += db
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")
