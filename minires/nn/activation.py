"""ReLU module: the relu op through the seam (minires/ops.py); math in minires/functional/activation.py."""
from .. import ops
from .module import Module


class ReLU(Module):
    """out = max(0, x); dx = dout where the unit was active, 0 elsewhere."""

    def forward(self, x):
        self.check_input(x, (None,) * getattr(x, "ndim", 0))  # any shape; an array of floats
        out, self.cache = ops.relu_forward(x)
        return out

    def backward(self, dout):
        out = self.pop_cache()
        self.check_dout(dout, out.shape)  # a smaller dout would broadcast silently
        return ops.relu_backward(dout, out)
