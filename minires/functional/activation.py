"""ReLU (docs/backward/relu.md).

    out = max(0, x)            dx = dout * [out > 0]

The cache is the output itself: the next layer keeps it alive anyway, so
remembering it costs no memory, and out > 0 exactly where x > 0.
"""
import numpy

from ..backend import get_array_module
from ..parallel import chunks_of, map_chunks


def relu_forward(x):
    """Returns (out, cache).

    Computed chunk by chunk over the batch on all CPU cores (NumPy runs
    element-wise operations on one core); on CuPy it is one operation.
    """
    xp = get_array_module(x)
    out = xp.empty_like(x)
    # max keeps x's dtype (and NaNs, so they get noticed)
    map_chunks(lambda c: xp.maximum(x[c], 0, out=out[c]), chunks_of(xp, x))
    return out, out


def relu_backward(dout, cache):
    """Returns dx: the gradient passes where the unit was active, is blocked elsewhere.

    On a GPU one kernel launch (functional/cuda.py) instead of a mask and a product.
    """
    if getattr(dout, "shape", None) != cache.shape:  # a smaller dout would broadcast silently
        raise ValueError(
            f"relu backward: expected dout of shape {tuple(cache.shape)} (the forward's output), "
            f"got shape {tuple(getattr(dout, 'shape', ()))}"
        )
    # BEGIN ASSIGNMENT relu_backward
    out = cache
    xp = get_array_module(dout, out)
    if xp is not numpy:
        from .cuda import relu_backward as relu_backward_kernel
        return relu_backward_kernel(dout, out)
    dx = xp.empty_like(dout)

    def dx_chunk(c):  # dx = dout * [out > 0], chunk by chunk on all CPU cores
        xp.greater(out[c], 0, out=dx[c])  # the mask, as 1.0 / 0.0, written into dx itself
        dx[c] *= dout[c]  # (two float passes: faster than a bool mask times floats)

    map_chunks(dx_chunk, chunks_of(xp, dx))
    return dx
    # END ASSIGNMENT relu_backward
