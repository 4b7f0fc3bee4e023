"""ReLU module: wraps minires.functional.activation."""
from ..functional.activation import relu_backward, relu_forward
from .module import Module


class ReLU(Module):
    """out = max(0, x); dx = dout where the unit was active, 0 elsewhere."""

    def forward(self, x):
        out, self.cache = relu_forward(x)
        return out

    def backward(self, dout):
        return relu_backward(dout, self.pop_cache())
