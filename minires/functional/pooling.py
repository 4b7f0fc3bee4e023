"""Pooling: max, average, and global average (NCHW), forward and backward.

A pooling window of kh x kw pixels slides with stride (sh, sw) over x_pad
(x with ph rows / pw columns of padding on each side); as in PyTorch the
stride defaults to the kernel size and the output size is

    Ho = (H + 2 ph - kh) // sh + 1,   Wo = (W + 2 pw - kw) // sw + 1

Max pool (padding is -inf, so a padded pixel never wins):

    out[n, c, y, x] = max_{i, j} x_pad[n, c, y*sh + i, x*sw + j]
    dx_pad[n, c, y*sh + i*, x*sw + j*] += dout[n, c, y, x]    (i*, j*) = the arg-max

The max is a switch: the gradient flows to the one pixel that won and to no
other. On ties the first arg-max in row-major window order wins, as in PyTorch.

Average pool (padding is 0 and counts in the divisor, PyTorch's default
``count_include_pad=True``):

    out[n, c, y, x] = 1/(kh kw) sum_{i, j} x_pad[n, c, y*sh + i, x*sw + j]
    dx_pad[n, c, y*sh + i, x*sw + j] += dout[n, c, y, x] / (kh kw)

Global average pool: out[n, c] = mean over H x W, dx = dout / (H W) everywhere.

The fast versions loop over the kh*kw kernel offsets only: for a fixed offset
(i, j), x_pad[:, :, i::sh, j::sw] (Ho x Wo of it) is one strided view holding
that offset's pixel of every window, so each step is one vectorized operation.
The ``_naive`` twins loop over every output pixel and read like the formulas.
"""
import numpy

from ..backend import get_array_module
from .conv import _pair


def _pool_geometry(name, x, kernel_size, stride, padding):
    """Check arguments; return (kernel, stride, padding, (Ho, Wo)) as pairs."""
    kernel = _pair(kernel_size, f"{name} kernel_size", 1)
    stride = kernel if stride is None else _pair(stride, f"{name} stride", 1)
    padding = _pair(padding, f"{name} padding", 0)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        # PyTorch's rule too: otherwise a window could hold only padding.
        raise ValueError(
            f"{name}: padding {padding} must be at most half the kernel size {kernel}"
        )
    hp, wp = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    if kernel[0] > hp or kernel[1] > wp:
        raise ValueError(
            f"{name}: kernel {kernel[0]}x{kernel[1]} is larger than the padded input {hp}x{wp} "
            f"(x of shape {tuple(x.shape)}, padding {padding})"
        )
    return kernel, stride, padding, _out_hw(x.shape, kernel, stride, padding)


def _out_hw(x_shape, kernel, stride, padding):
    """(Ho, Wo) = ((H + 2 ph - kh) // sh + 1, (W + 2 pw - kw) // sw + 1)."""
    return tuple((x_shape[2 + a] + 2 * padding[a] - kernel[a]) // stride[a] + 1 for a in (0, 1))


def _check_dout(name, dout, expected):
    if tuple(dout.shape) != tuple(expected):
        raise ValueError(
            f"{name} backward: expected dout of shape {tuple(expected)} (the forward's output), "
            f"got shape {tuple(dout.shape)}"
        )


def _pad(x, ph, pw, value):
    """x with ph rows / pw columns of ``value`` on each side (x itself if no padding)."""
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    N, C, H, W = x.shape
    x_pad = xp.full((N, C, H + 2 * ph, W + 2 * pw), value, dtype=x.dtype)
    x_pad[:, :, ph:ph + H, pw:pw + W] = x
    return x_pad


def _offset_view(a, i, j, stride, out_hw):
    """a[:, :, y*sh + i, x*sw + j] for all output positions (y, x): a (N, C, Ho, Wo) view."""
    (sh, sw), (Ho, Wo) = stride, out_hw
    return a[:, :, i:i + sh * Ho:sh, j:j + sw * Wo:sw]


def _crop(dx_pad, padding, x_shape):
    ph, pw = padding
    return dx_pad[:, :, ph:ph + x_shape[2], pw:pw + x_shape[3]]


# --------------------------------------------------------------------------
# max pool
# --------------------------------------------------------------------------
def maxpool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max pool. x (N, C, H, W) -> out (N, C, Ho, Wo); returns (out, cache).

    The cache holds, for every output, which kernel offset k = i*kw + j won
    (the arg-max), so backward needs no comparisons.
    """
    xp = get_array_module(x)
    kernel, stride, padding, out_hw = _pool_geometry("maxpool2d", x, kernel_size, stride, padding)
    kh, kw = kernel
    x_pad = _pad(x, *padding, value=-numpy.inf)
    out = _offset_view(x_pad, 0, 0, stride, out_hw).copy()
    # the smallest integer type that holds kh*kw - 1: one byte up to 16x16 windows
    argmax = xp.zeros(out.shape, dtype=numpy.min_scalar_type(kh * kw - 1))
    for k in range(1, kh * kw):
        candidate = _offset_view(x_pad, k // kw, k % kw, stride, out_hw)
        # Strictly greater: on ties the earlier offset keeps the max (PyTorch).
        # A NaN always wins, so NaN propagates instead of being hidden.
        wins = (candidate > out) | xp.isnan(candidate)
        xp.copyto(out, candidate, where=wins)
        xp.copyto(argmax, k, where=wins)
    return out, (x.shape, argmax, kernel, stride, padding)


def maxpool2d_backward(dout, cache):
    """Route each output's gradient to its arg-max pixel. Returns dx (N, C, H, W)."""
    # BEGIN ASSIGNMENT maxpool2d_backward
    x_shape, argmax, (kh, kw), stride, padding = cache
    xp = get_array_module(dout)
    _check_dout("maxpool2d", dout, argmax.shape)
    N, C, H, W = x_shape
    dx_pad = xp.zeros((N, C, H + 2 * padding[0], W + 2 * padding[1]), dtype=dout.dtype)
    for k in range(kh * kw):
        # Windows overlap when stride < kernel, hence +=.
        target = _offset_view(dx_pad, k // kw, k % kw, stride, dout.shape[2:])
        target += xp.where(argmax == k, dout, 0)
    return xp.ascontiguousarray(_crop(dx_pad, padding, x_shape))
    # END ASSIGNMENT maxpool2d_backward


def maxpool2d_forward_naive(x, kernel_size, stride=None, padding=0):
    """Loop version of :func:`maxpool2d_forward`. Returns (out, cache)."""
    xp = get_array_module(x)
    kernel, stride, padding, (Ho, Wo) = _pool_geometry("maxpool2d", x, kernel_size, stride, padding)
    (kh, kw), (sh, sw) = kernel, stride
    x_pad = _pad(x, *padding, value=-numpy.inf)
    N, C = x.shape[:2]
    out = xp.zeros((N, C, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for row in range(Ho):
                for col in range(Wo):
                    window = x_pad[n, c, row * sh:row * sh + kh, col * sw:col * sw + kw]
                    out[n, c, row, col] = window.max()
    return out, (x, kernel, stride, padding)


def maxpool2d_backward_naive(dout, cache):
    """Loop version of :func:`maxpool2d_backward`. Returns dx."""
    x, (kh, kw), (sh, sw), padding = cache
    xp = get_array_module(dout, x)
    _check_dout("maxpool2d", dout, x.shape[:2] + _out_hw(x.shape, (kh, kw), (sh, sw), padding))
    N, C, Ho, Wo = dout.shape
    x_pad = _pad(x, *padding, value=-numpy.inf)
    dx_pad = xp.zeros(x_pad.shape, dtype=dout.dtype)
    for n in range(N):
        for c in range(C):
            for row in range(Ho):
                for col in range(Wo):
                    top, left = row * sh, col * sw
                    window = x_pad[n, c, top:top + kh, left:left + kw]
                    k = int(xp.argmax(window))  # the first maximum in row-major order
                    dx_pad[n, c, top + k // kw, left + k % kw] += dout[n, c, row, col]
    return _crop(dx_pad, padding, x.shape)


# --------------------------------------------------------------------------
# average pool
# --------------------------------------------------------------------------
def avgpool2d_forward(x, kernel_size, stride=None, padding=0):
    """Average pool (zero padding counted in the divisor). Returns (out, cache)."""
    xp = get_array_module(x)
    kernel, stride, padding, out_hw = _pool_geometry("avgpool2d", x, kernel_size, stride, padding)
    kh, kw = kernel
    x_pad = _pad(x, *padding, value=0)
    out = xp.zeros(x.shape[:2] + out_hw, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out += _offset_view(x_pad, i, j, stride, out_hw)
    out /= kh * kw  # in place: keeps the dtype (float32 stays float32)
    return out, (x.shape, kernel, stride, padding)


def avgpool2d_backward(dout, cache):
    """Spread each output's gradient evenly over its window. Returns dx."""
    x_shape, (kh, kw), stride, padding = cache
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    out_hw = _out_hw(x_shape, (kh, kw), stride, padding)
    _check_dout("avgpool2d", dout, (N, C) + out_hw)
    share = dout / (kh * kw)
    dx_pad = xp.zeros((N, C, H + 2 * padding[0], W + 2 * padding[1]), dtype=dout.dtype)
    for i in range(kh):
        for j in range(kw):
            target = _offset_view(dx_pad, i, j, stride, out_hw)
            target += share  # overlapping windows add
    return xp.ascontiguousarray(_crop(dx_pad, padding, x_shape))


def avgpool2d_forward_naive(x, kernel_size, stride=None, padding=0):
    """Loop version of :func:`avgpool2d_forward`. Returns (out, cache)."""
    xp = get_array_module(x)
    kernel, stride, padding, (Ho, Wo) = _pool_geometry("avgpool2d", x, kernel_size, stride, padding)
    (kh, kw), (sh, sw) = kernel, stride
    x_pad = _pad(x, *padding, value=0)
    N, C = x.shape[:2]
    out = xp.zeros((N, C, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for row in range(Ho):
                for col in range(Wo):
                    window = x_pad[n, c, row * sh:row * sh + kh, col * sw:col * sw + kw]
                    out[n, c, row, col] = window.sum() / (kh * kw)
    return out, (x.shape, kernel, stride, padding)


def avgpool2d_backward_naive(dout, cache):
    """Loop version of :func:`avgpool2d_backward`. Returns dx."""
    x_shape, (kh, kw), (sh, sw), padding = cache
    xp = get_array_module(dout)
    _check_dout("avgpool2d", dout, x_shape[:2] + _out_hw(x_shape, (kh, kw), (sh, sw), padding))
    N, C, Ho, Wo = dout.shape
    dx_pad = xp.zeros((N, C, x_shape[2] + 2 * padding[0], x_shape[3] + 2 * padding[1]),
                      dtype=dout.dtype)
    for n in range(N):
        for c in range(C):
            for row in range(Ho):
                for col in range(Wo):
                    top, left = row * sh, col * sw
                    dx_pad[n, c, top:top + kh, left:left + kw] += dout[n, c, row, col] / (kh * kw)
    return _crop(dx_pad, padding, x_shape)


# --------------------------------------------------------------------------
# global average pool
# --------------------------------------------------------------------------
def global_avgpool_forward(x):
    """Mean over each channel's H x W pixels. x (N, C, H, W) -> out (N, C, 1, 1)."""
    if x.ndim != 4:
        raise ValueError(
            f"global_avgpool: expected x of shape (N, C, H, W), got shape {tuple(x.shape)}"
        )
    return x.mean(axis=(2, 3), keepdims=True), x.shape


def global_avgpool_backward(dout, cache):
    """Every pixel gets 1/(H W) of its channel's gradient. Returns dx (N, C, H, W)."""
    x_shape = cache
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    _check_dout("global_avgpool", dout, (N, C, 1, 1))
    dx = xp.empty(x_shape, dtype=dout.dtype)
    dx[...] = dout / (H * W)  # broadcast over H x W
    return dx
