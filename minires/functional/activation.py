"""ReLU (docs/backward/relu.md).

    out = max(0, x)            dx = dout * [out > 0]

The cache is the output itself: the next layer keeps it alive anyway, so
remembering it costs no memory, and out > 0 exactly where x > 0.
"""
from ..backend import get_array_module


def check_relu_dout(dout, out):
    """Raise a ValueError unless dout has the forward output's shape (a smaller
    dout would broadcast silently into a wrong gradient)."""
    if getattr(dout, "shape", None) != out.shape:
        raise ValueError(
            f"relu backward: expected dout of shape {tuple(out.shape)} (the forward's output), "
            f"got shape {tuple(getattr(dout, 'shape', ()))}"
        )


def relu_forward(x):
    """Returns (out, cache). max keeps x's dtype, and NaNs, so they get noticed."""
    out = get_array_module(x).maximum(x, 0)
    return out, out


def relu_backward(dout, cache):
    """Returns dx: the gradient passes where the unit was active, is blocked elsewhere."""
    check_relu_dout(dout, cache)
    # BEGIN ASSIGNMENT relu_backward
    out = cache
    return dout * (out > 0)
    # END ASSIGNMENT relu_backward
