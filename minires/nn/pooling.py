"""Pooling modules: wrap minires.functional.pooling (math in docs/backward/pooling.md)."""
from .. import ops
from .conv import _pair
from .module import Module, check_sizes


class _Pool2d(Module):
    """Shared by MaxPool2d and AvgPool2d; they differ only in the two ops they call."""
    forward_fn = backward_fn = None

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        name = type(self).__name__
        check_sizes(name, kernel_size=self.kernel_size, stride=self.stride)
        check_sizes(name, minimum=0, padding=self.padding)
        if any(p > k // 2 for p, k in zip(_pair(self.padding), _pair(self.kernel_size))):
            # PyTorch's rule too: otherwise a window could hold only padding
            raise ValueError(f"{name}: padding {padding!r} must be at most half the kernel size {kernel_size!r}")

    def forward(self, x):
        self.check_input(x, (None, None, None, None))
        self.check_window(x, _pair(self.kernel_size), _pair(self.padding))
        out, self.cache = getattr(ops, self.op + "_forward")(x, self.kernel_size, self.stride, self.padding)
        return out

    def backward(self, dout):
        return getattr(ops, self.op + "_backward")(dout, self.pop_cache())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max over each window; backward routes the gradient to the arg-max."""
    op = "maxpool2d"  # ops.maxpool2d_forward / ops.maxpool2d_backward


class AvgPool2d(_Pool2d):
    """Mean over each window (padding counted, as PyTorch); backward spreads dout evenly."""
    op = "avgpool2d"


class AdaptiveAvgPool2d(Module):
    """Global average pooling: (N, C, H, W) -> (N, C, 1, 1). Only output_size=1 is supported."""

    def __init__(self, output_size=1):
        super().__init__()
        if output_size not in (1, (1, 1)):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 is supported, got {output_size!r}")
        self.output_size = 1

    def forward(self, x):
        self.check_input(x, (None, None, None, None))
        out, self.cache = ops.global_avgpool_forward(x)
        return out

    def backward(self, dout):
        return ops.global_avgpool_backward(dout, self.pop_cache())

    def extra_repr(self):
        return "output_size=1"
