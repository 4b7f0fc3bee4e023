"""Linear and Flatten modules: their ops through the seam (minires/ops.py); math in minires/functional/linear.py."""
import math

from .. import ops
from . import init
from .module import Module, check_sizes


class Linear(Module):
    """out = x @ weight.T + bias; x (N, in_features) -> (N, out_features).

    Initialized as torch.nn.Linear: weight and bias uniform in +-1/sqrt(in_features).
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        check_sizes("Linear", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.add_param("weight", init.uniform((out_features, in_features), bound))
        if bias:
            self.add_param("bias", init.uniform((out_features,), bound))

    def forward(self, x):
        w = self.params["weight"]
        self.check_input(x, (None, self.in_features), w.dtype)
        out, self.cache = ops.linear_forward(x, w, self.params.get("bias"))
        return out

    def backward(self, dout):
        cache = self.pop_cache()
        x, w = cache[0], cache[1]
        self.check_dout(dout, (x.shape[0], w.shape[0]))
        dx, dw, db = ops.linear_backward(dout, cache)
        self.grads["weight"] += dw
        if db is not None:
            self.grads["bias"] += db
        return dx

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W)."""

    def forward(self, x):
        # (N, ...) of any rank >= 2; a bare (N,) has no features to flatten: a bug upstream
        self.check_input(x, (None,) * max(getattr(x, "ndim", 0), 2))
        out, self.cache = ops.flatten_forward(x)
        return out

    def backward(self, dout):
        x_shape = self.pop_cache()
        # a reshape would accept any dout of the right size, in the wrong order
        self.check_dout(dout, (x_shape[0], math.prod(x_shape[1:])))
        return ops.flatten_backward(dout, x_shape)
