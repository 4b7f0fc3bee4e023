"""ReLU module: wraps minires.functional.activation."""
from ..functional.activation import relu_backward, relu_forward
from .module import Module


class ReLU(Module):
    """out = max(0, x); dx = dout where the unit was active, 0 elsewhere."""

    def forward(self, x):
        self.check_input(x, (None,) * getattr(x, "ndim", 0))  # any shape; an array of floats
        out, self.cache = relu_forward(x)
        return out

    def backward(self, dout):
        out = self.pop_cache()
        self.check_dout(dout, out.shape)  # a smaller dout would broadcast silently
        return relu_backward(dout, out)
