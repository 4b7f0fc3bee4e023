"""Engine BatchNorm2d: the same numbers and contract as minires.functional.batchnorm.

CPU: three passes over x forward and two backward, each over chunks of the
batch on all CPU cores (kernels/parallel.py), small enough that a chunk is
still in the core's cache for the next operation on it; per-channel sums over
the contiguous (N, C, H*W) view. GPU: two kernel launches each way
(kernels/cuda.py). The math is in the textbook's docstring.
"""
import numpy

from ..backend import get_array_module
from ..functional.batchnorm import check_batchnorm, update_running_stats
from . import cuda
from .parallel import chunks_of, map_chunks

#: Bytes of x per chunk (NumPy): small enough that a chunk is still in the
#: core's cache for the next pass over it (the size is measured in docs/performance.md).
CHUNK_BYTES = 1 << 20


def _channels_view(a):
    """(N, C, H, W) -> (N, C, H*W), a view when ``a`` is C-contiguous.

    Per-channel sums over this view run along contiguous rows of H*W values
    (then over N), faster than ``sum(axis=(0, 2, 3))``.
    """
    return a.reshape(a.shape[0], a.shape[1], -1)


def _channel_sum(a3, b3=None):
    """sum over N and L of a3 (or of a3 * b3, without materializing the product)
    for (N, C, L) arrays -> (C,), in their dtype.

    einsum sums each contiguous row of L values (no temporary array for the
    product, faster than ``.sum``); the N row sums are then added
    pairwise by ``.sum``, so float32 accumulates over at most L values at a time.
    """
    xp = get_array_module(a3)
    rows = xp.einsum("ncl->nc", a3) if b3 is None else xp.einsum("ncl,ncl->nc", a3, b3)
    return rows.sum(axis=0)


def _rows(v, x3):
    """(C,) -> the operand that applies v[c] to channel c of (n, C, L) chunks of x3.

    A (C, L) block, v[c] repeated along row c: same numbers as the column
    ``v[:, None]``, faster, because NumPy runs a (C, 1) column against a
    (n, C, L) chunk slower than two contiguous operands, while the block
    broadcasts along n only, so every inner loop reads two contiguous rows.
    Building it costs one image's worth of work, so a batch of fewer than 4
    images gets the column.
    """
    if x3.shape[0] < 4:
        return v[:, None]
    xp = get_array_module(v)
    return xp.repeat(v[:, None], x3.shape[2], axis=1)


def _chunks(xp, x3):
    """Slices of the batch for the fast path: at most CHUNK_BYTES of x each."""
    return chunks_of(xp, x3, CHUNK_BYTES)


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var,
                        momentum=0.1, eps=1e-5, training=True, num_batches_tracked=None):
    """Normalize x (N, C, H, W) per channel; returns (out, cache).

    In training mode ``running_mean`` / ``running_var`` (C,) are updated in
    place, and so is ``num_batches_tracked`` if given (a 0-d integer array, +1;
    on a GPU it rides along in a kernel launch).
    The cache is ``(x_hat, gamma, inv_std, training)``, x_hat shaped like x.

    Three passes over x, each over chunks of the batch on all CPU cores
    (:func:`minires.kernels.parallel.map_chunks`) -- the mean; x - mean and its sum
    of squares while the chunk is in cache; normalize and scale. Reductions
    run over the contiguous (N, C, H*W) view; two full-size arrays are
    allocated (x_hat and out). Python-float scalars keep float32 float32.
    """
    xp = get_array_module(x, gamma, beta, running_mean, running_var)
    check_batchnorm(x, gamma, training)
    x3 = _channels_view(x)
    m = x3.shape[0] * x3.shape[2]  # values per channel
    if xp is not numpy:  # a GPU: two kernel launches
        if training:  # mean, inv_std, the running-stat update, the count
            mean, inv_std = cuda.batchnorm_train_stats(x, running_mean, running_var, eps, momentum,
                                                       num_batches_tracked)
        else:
            mean, inv_std = running_mean, cuda.batchnorm_eval_inv_std(running_var, eps)
        x_hat, out = cuda.batchnorm_normalize(x, mean, inv_std, gamma, beta)
        return out, (x_hat, gamma, inv_std, training)

    chunks = _chunks(xp, x3)
    if training:
        mean = sum(map_chunks(lambda c: _channel_sum(x3[c]), chunks)) / m
    else:
        mean = running_mean
    x_hat = xp.empty_like(x3)
    mean_rows = _rows(mean, x3)

    def center(c):  # x_hat = x - mean, and its sum of squares while in cache
        xp.subtract(x3[c], mean_rows, out=x_hat[c])
        return _channel_sum(x_hat[c], x_hat[c]) if training else None

    squares = map_chunks(center, chunks)
    if training:
        var = sum(squares) / m                     # biased
        update_running_stats(running_mean, running_var, mean, var, momentum, m)
        if num_batches_tracked is not None:
            num_batches_tracked[...] += 1  # in place: the caller's array (a 0-d array)
    else:
        var = running_var
    inv_std = 1 / xp.sqrt(var + eps)
    out = xp.empty_like(x3)
    inv_std_rows, gamma_rows, beta_rows = (_rows(v, x3) for v in (inv_std, gamma, beta))

    def normalize(c):  # x_hat *= inv_std (in place); out = gamma * x_hat + beta
        x_hat[c] *= inv_std_rows
        xp.multiply(x_hat[c], gamma_rows, out=out[c])
        out[c] += beta_rows

    map_chunks(normalize, chunks)
    return out.reshape(x.shape), (x_hat.reshape(x.shape), gamma, inv_std, training)


def batchnorm2d_backward(dout, cache):
    """Closed-form backward; returns (dx, dgamma, dbeta).

    Training: dx = gamma * inv_std * (dout - dbeta / M - x_hat * dgamma / M),
    the closed form of the module docstring with the 1/M moved inside.
    Two passes over chunks of the batch on all CPU cores: the two sums, then
    dx. One full-size array is allocated (dx); dout and x_hat are only read.
    On a GPU, two kernel launches (kernels/cuda.py).
    """
    x_hat, gamma, inv_std, training = cache
    xp = get_array_module(dout, x_hat)
    if xp is not numpy:
        return cuda.batchnorm_backward(dout, x_hat, gamma, inv_std, training)
    dout3, x_hat3 = _channels_view(dout), _channels_view(x_hat)  # (N, C, H*W)
    chunks = _chunks(xp, dout3)
    sums = map_chunks(lambda c: (_channel_sum(dout3[c]), _channel_sum(dout3[c], x_hat3[c])), chunks)
    dbeta = sum(s[0] for s in sums)                      # sum of dout
    dgamma = sum(s[1] for s in sums)                     # sum of dout * x_hat
    m = dout3.shape[0] * dout3.shape[2]
    scale, dgamma_m, dbeta_m = (_rows(v, dout3) for v in (gamma * inv_std, dgamma / m, dbeta / m))
    dx = xp.empty_like(dout3)

    def dx_chunk(c):  # dx = scale * (dout - dbeta / M - x_hat * dgamma / M)
        d = dx[c]
        if not training:
            # Eval mode: mean and var are constants, so BN is an affine map.
            xp.multiply(dout3[c], scale, out=d)
            return
        xp.multiply(x_hat3[c], dgamma_m, out=d)
        xp.subtract(dout3[c], d, out=d)
        d -= dbeta_m
        d *= scale

    map_chunks(dx_chunk, chunks)
    return dx.reshape(dout.shape), dgamma, dbeta
