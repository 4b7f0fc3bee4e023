"""2-D convolution (a cross-correlation, as in PyTorch), forward and backward.

Shapes: x (N, C, H, W), weights w (F, C, kh, kw), bias b (F,),
stride (sh, sw), padding (ph, pw); x_pad is x with ph zero rows above and
below and pw zero columns left and right (Hp = H + 2 ph, Wp = W + 2 pw).

    out[n, f, y, x] = b[f] + sum_{c, i, j} w[f, c, i, j] * x_pad[n, c, y*sh + i, x*sw + j]

    Ho = (Hp - kh) // sh + 1,   Wo = (Wp - kw) // sw + 1

Backward, with dout = dL/dout (N, F, Ho, Wo). Every weight touches many
outputs, so its gradient is a sum; every input pixel feeds many windows, so
its gradient collects a contribution from each (fan-out adds):

    db[f]          = sum_{n, y, x} dout[n, f, y, x]
    dw[f, c, i, j] = sum_{n, y, x} dout[n, f, y, x] * x_pad[n, c, y*sh + i, x*sw + j]
    dx_pad[n, c, y*sh + i, x*sw + j] += dout[n, f, y, x] * w[f, c, i, j]
    dx = dx_pad with the padding cut off

Two implementations, tested equal:

* ``conv2d_forward_naive`` / ``conv2d_backward_naive``: the sums above as loops.
  Read these first; they are slow (Python loops over every output pixel).
* ``conv2d_forward`` / ``conv2d_backward``: im2col. Copy every receptive field
  into the column matrix

      cols[(c, i, j), (n, y, x)] = x_pad[n, c, y*sh + i, x*sw + j]     (C*kh*kw, N*Ho*Wo)

  and the convolution becomes ONE matrix product (GEMM), which BLAS runs
  near the speed of the machine:

      out_mat = w_mat @ cols            w_mat = w.reshape(F, C*kh*kw)
      dw_mat  = dout_mat @ cols.T       dout_mat[f, (n, y, x)] = dout[n, f, y, x]
      dcols   = w_mat.T @ dout_mat      then dx = col2im(dcols): add every
                                        column back onto the pixels it came from
"""
import numpy

from ..backend import get_array_module


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _pair(value, name, minimum):
    """``value`` (an int or a pair of ints) as a pair ``(a, b)``, each >= minimum."""
    if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, numpy.integer)) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def conv_geometry(x, w, b, stride, padding):
    """Check shapes; return ((sh, sw), (ph, pw), (Ho, Wo)). Raises ValueError."""
    stride = _pair(stride, "conv2d stride", 1)
    padding = _pair(padding, "conv2d padding", 0)
    if x.ndim != 4:
        raise ValueError(f"conv2d: expected x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"conv2d: expected w of shape (F, C, kh, kw), got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"conv2d: w of shape {tuple(w.shape)} expects {w.shape[1]} input channels, "
            f"got x of shape {tuple(x.shape)} with {x.shape[1]} channels"
        )
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = w.shape[2:]
    hp, wp = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
    if kh > hp or kw > wp:
        raise ValueError(
            f"conv2d: kernel {kh}x{kw} (w of shape {tuple(w.shape)}) is larger than the padded "
            f"input {hp}x{wp} (x of shape {tuple(x.shape)}, padding {padding})"
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(
            f"conv2d: expected bias of shape ({w.shape[0]},) for w of shape {tuple(w.shape)}, "
            f"got shape {tuple(b.shape)}"
        )
    return stride, padding, ((hp - kh) // sh + 1, (wp - kw) // sw + 1)


def check_conv_dout(dout, expected):
    """Raise a ValueError unless dout has the forward output's shape."""
    if tuple(dout.shape) != tuple(expected):
        raise ValueError(
            f"conv2d backward: expected dout of shape {tuple(expected)} (the forward's output), "
            f"got shape {tuple(dout.shape)}"
        )


# --------------------------------------------------------------------------
# naive reference: the formulas of the module docstring, as loops
# --------------------------------------------------------------------------
def conv2d_forward_naive(x, w, b=None, stride=1, padding=0):
    """Loop version of :func:`conv2d_forward` (the reference). Returns (out, cache)."""
    xp = get_array_module(x, w, b)
    (sh, sw), (ph, pw), (Ho, Wo) = conv_geometry(x, w, b, stride, padding)
    N, F, kh, kw = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = xp.zeros((N, F, Ho, Wo), dtype=xp.result_type(x, w))
    for n in range(N):
        for f in range(F):
            for row in range(Ho):
                for col in range(Wo):
                    top, left = row * sh, col * sw
                    window = x_pad[n, :, top:top + kh, left:left + kw]  # (C, kh, kw)
                    out[n, f, row, col] = xp.sum(window * w[f])
            if b is not None:
                out[n, f] += b[f]
    return out, (x, w, b, (sh, sw), (ph, pw))


def conv2d_backward_naive(dout, cache):
    """Loop version of :func:`conv2d_backward`. Returns (dx, dw, db)."""
    x, w, b, (sh, sw), (ph, pw) = cache
    xp = get_array_module(dout, x, w)
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    check_conv_dout(dout, (N, F, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1))
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dx_pad = xp.zeros(x_pad.shape, dtype=xp.result_type(dout, w))
    dw = xp.zeros(w.shape, dtype=xp.result_type(dout, x))
    for n in range(N):
        for f in range(F):
            for row in range(dout.shape[2]):
                for col in range(dout.shape[3]):
                    top, left = row * sh, col * sw
                    g = dout[n, f, row, col]
                    # out[n, f, row, col] read this window with weights w[f] ...
                    dw[f] += g * x_pad[n, :, top:top + kh, left:left + kw]
                    # ... so each pixel of the window gets w[f] times the gradient.
                    dx_pad[n, :, top:top + kh, left:left + kw] += g * w[f]
    dx = dx_pad[:, :, ph:ph + H, pw:pw + W]
    db = dout.sum(axis=(0, 2, 3)) if b is not None else None
    return dx, dw, db


# --------------------------------------------------------------------------
# im2col / col2im (columns laid out (C*kh*kw, N*Ho*Wo))
# --------------------------------------------------------------------------
def _out_hw(H, W, kh, kw, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1


def im2col(x, kh, kw, stride, padding):
    """Column matrix of x: cols[(c, i, j), (n, y, x)] = x_pad[n, c, y*sh + i, x*sw + j].

    x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo). One loop over the kh*kw kernel
    offsets: for a fixed (i, j), x_pad[:, :, i::sh, j::sw] (Ho x Wo of it) is
    that offset's pixel of every window, one strided slice.
    """
    xp = get_array_module(x)
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, W = x.shape
    Ho, Wo = _out_hw(H, W, kh, kw, stride, padding)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window_pixels = x_pad[:, :, i:i + sh * Ho:sh, j:j + sw * Wo:sw]  # (N, C, Ho, Wo)
            cols[:, i, j] = window_pixels.transpose(1, 0, 2, 3)
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def col2im(cols, x_shape, kh, kw, stride, padding):
    """Adjoint of :func:`im2col`: add every column entry back onto its pixel.

    cols (C*kh*kw, N*Ho*Wo) -> dx (N, C, H, W). Windows overlap, so the
    contributions are ADDED; for a fixed offset (i, j) the target pixels are
    all distinct, so one vectorized += per offset is exact.
    """
    xp = get_array_module(cols)
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, W = x_shape
    Ho, Wo = _out_hw(H, W, kh, kw, stride, padding)
    cols = cols.reshape(C, kh, kw, N, Ho, Wo)
    dx_pad = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx_pad[:, :, i:i + sh * Ho:sh, j:j + sw * Wo:sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return dx_pad[:, :, ph:ph + H, pw:pw + W]


# --------------------------------------------------------------------------
# im2col + one GEMM
# --------------------------------------------------------------------------
def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """Convolution by im2col + one matrix product. Returns (out, cache).

    x (N, C, H, W), w (F, C, kh, kw), b (F,) or None; stride and padding are
    ints or (row, column) pairs. out (N, F, Ho, Wo), same dtype as x and w.
    The cache is (x, w, b, stride, padding): backward builds the columns again.
    """
    xp = get_array_module(x, w, b)
    stride, padding, (Ho, Wo) = conv_geometry(x, w, b, stride, padding)
    N, F, kh, kw = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    out_mat = w.reshape(F, -1) @ im2col(x, kh, kw, stride, padding)  # (F, N*Ho*Wo)
    out = out_mat.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3)
    if b is not None:
        out = out + b.reshape(1, F, 1, 1)
    return xp.ascontiguousarray(out), (x, w, b, stride, padding)


def conv2d_backward(dout, cache, input_grad=True):
    """Gradients of :func:`conv2d_forward`. Returns (dx, dw, db); db is None without bias.

    ``input_grad=False`` returns None for dx: a network's first convolution
    reads the images, whose gradient training does not need (the engine skips
    computing it; here it is computed and dropped, to keep the body simple).
    """
    x, w, b, stride, padding = cache
    F, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    stride, padding, out_hw = conv_geometry(x, w, b, stride, padding)
    check_conv_dout(dout, (x.shape[0], F) + out_hw)
    # BEGIN ASSIGNMENT conv2d_backward
    cols = im2col(x, kh, kw, stride, padding)             # (C*kh*kw, N*Ho*Wo), as in the forward
    dout_mat = dout.transpose(1, 0, 2, 3).reshape(F, -1)  # (F, N*Ho*Wo)
    # dw_mat = dout_mat @ cols.T, written as (cols @ dout_mat.T).T: BLAS runs this orientation faster
    dw = (cols @ dout_mat.T).T.reshape(w.shape)
    db = dout.sum(axis=(0, 2, 3)) if b is not None else None
    dx = col2im(w.reshape(F, -1).T @ dout_mat, x.shape, kh, kw, stride, padding)
    # END ASSIGNMENT conv2d_backward
    return (dx if input_grad else None), dw, db
