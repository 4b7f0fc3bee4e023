"""Pooling modules: wrap minires.functional.pooling (math in docs/backward/pooling.md)."""
from ..functional import pooling as F
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
        out, self.cache = self.forward_fn(x, self.kernel_size, self.stride, self.padding)
        return out

    def backward(self, dout):
        return self.backward_fn(dout, self.pop_cache())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max over each window; backward routes the gradient to the arg-max."""
    forward_fn = staticmethod(F.maxpool2d_forward)
    backward_fn = staticmethod(F.maxpool2d_backward)


class AvgPool2d(_Pool2d):
    """Mean over each window (padding counted, as PyTorch); backward spreads dout evenly."""
    forward_fn = staticmethod(F.avgpool2d_forward)
    backward_fn = staticmethod(F.avgpool2d_backward)


class AdaptiveAvgPool2d(Module):
    """Global average pooling: (N, C, H, W) -> (N, C, 1, 1). Only output_size=1 is supported."""

    def __init__(self, output_size=1):
        super().__init__()
        if output_size not in (1, (1, 1)):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 is supported, got {output_size!r}")
        self.output_size = 1

    def forward(self, x):
        self.check_input(x, (None, None, None, None))
        out, self.cache = F.global_avgpool_forward(x)
        return out

    def backward(self, dout):
        return F.global_avgpool_backward(dout, self.pop_cache())

    def extra_repr(self):
        return "output_size=1"
