"""Engine ReLU: the same contract as minires.functional.activation, faster.

On NumPy the work goes chunk by chunk over the batch on all CPU cores (NumPy
runs element-wise operations on one core); on CuPy the backward is one kernel
launch (kernels/cuda.py) instead of a mask and a product.
"""
import numpy

from ..backend import get_array_module
from ..functional.activation import check_relu_dout
from . import cuda
from .parallel import chunks_of, map_chunks


def relu_forward(x):
    """Returns (out, cache); the cache is out itself, as in the textbook."""
    xp = get_array_module(x)
    out = xp.empty_like(x)
    # max keeps x's dtype (and NaNs, so they get noticed)
    map_chunks(lambda c: xp.maximum(x[c], 0, out=out[c]), chunks_of(xp, x))
    return out, out


def relu_backward(dout, cache):
    """Returns dx = dout * [out > 0]."""
    check_relu_dout(dout, cache)
    out = cache
    xp = get_array_module(dout, out)
    if xp is not numpy:
        return cuda.relu_backward(dout, out)
    dx = xp.empty_like(dout)

    def dx_chunk(c):
        xp.greater(out[c], 0, out=dx[c])  # the mask, as 1.0 / 0.0, written into dx itself
        dx[c] *= dout[c]  # two float passes, no bool array (docs/performance.md)

    map_chunks(dx_chunk, chunks_of(xp, dx))
    return dx
