"""Fully connected layer and flatten (docs/backward/linear.md).

    out = x @ w.T + b          x (N, D), w (M, D), b (M,), out (N, M)

    dx = dout @ w              (N, D)
    dw = dout.T @ x            (M, D)   summed over the batch by the matmul
    db = sum_n dout            (M,)
"""
from ..backend import get_array_module


def linear_forward(x, w, b=None):
    """Returns (out, cache)."""
    get_array_module(x, w, b)  # raises on NumPy/CuPy mixing
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"linear: expected x of shape (N, {w.shape[1]}) for w of shape "
            f"{tuple(w.shape)}, got x of shape {tuple(x.shape)}"
        )
    out = x @ w.T
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def linear_backward(dout, cache):
    """Returns (dx, dw, db); db is None when there was no bias."""
    # BEGIN ASSIGNMENT linear_backward
    x, w, has_bias = cache
    dx = dout @ w
    dw = dout.T @ x
    db = dout.sum(axis=0) if has_bias else None
    return dx, dw, db
    # END ASSIGNMENT linear_backward


def linear_forward_naive(x, w, b=None):
    """Reference forward: out[n, m] = sum_d x[n, d] w[m, d] + b[m], as loops."""
    xp = get_array_module(x, w)
    n_batch, n_out = x.shape[0], w.shape[0]
    out = xp.zeros((n_batch, n_out), dtype=x.dtype)
    for n in range(n_batch):
        for m in range(n_out):
            out[n, m] = (x[n] * w[m]).sum() + (b[m] if b is not None else 0)
    return out, (x, w, b is not None)


def flatten_forward(x):
    """(N, ...) -> (N, prod(...)); the cache is the input shape."""
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(dout, cache):
    """Flatten only moves values around: reshape the gradient back."""
    return dout.reshape(cache)
