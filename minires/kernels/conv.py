"""Engine convolution: the same numbers and contract as minires.functional.conv, faster.

The math (im2col + one GEMM) is in the textbook's docstring. What the engine
adds, and why the code looks the way it does:

* Rows (c, i, j), columns (n, y, x): with NCHW data every row of ``cols`` is
  then a shifted copy of one channel, so building it is a few long copies, not
  a gather (faster than the transposed (N*Ho*Wo, C*kh*kw) layout).
* The batch goes through in chunks of about :data:`CHUNK_BYTES` of columns.
  On a memory-bound 2-core machine this matters more than anything else: the
  columns are kh*kw times larger than x, and writing them all to RAM and
  reading them back costs more than the arithmetic. The chunks run on all
  CPU cores (:func:`minires.kernels.parallel.map_chunks`), each thread building its
  columns in its own reused buffer. The backward builds each chunk's
  columns again (from x; for "same" convolutions from dout, below) instead
  of keeping them from the forward, which would hold all the columns of a
  step at once. On CuPy the whole batch is one chunk
  (a GPU wants one large GEMM).
* "Same" convolutions at stride 1 (3x3 padding 1, 1x1 padding 0) lay each
  channel out as one line, so that every row of ``cols`` is one contiguous
  shifted slice of it (:func:`_same_cols`), and compute dx as another "same"
  convolution, of dout with the flipped kernel: no col2im. The columns of
  dout built for that also give dw, so x's columns are not rebuilt
  (dw[f, c, i, j] = sum_q dcols[(f, kh-1-i, kw-1-j), q] * x[c, q]), unless
  there are fewer input than output channels. Other geometries use the
  general strided-view :func:`im2col` / :func:`col2im`.
"""
import numpy
from numpy.lib.stride_tricks import as_strided

from ..backend import get_array_module
from ..functional.conv import _pair, check_conv_dout, conv_geometry
from . import cuda
from .parallel import batch_chunks, map_chunks, scratch

#: Most bytes of the column matrix in one chunk (NumPy). The number of chunks is
#: rounded up to a multiple of 4 (kernels.parallel.batch_chunks). Small enough
#: to stay in cache, large enough that per-chunk overhead does not show
#: (the sizes tried are in docs/performance.md).
CHUNK_BYTES = 8 << 20


# --------------------------------------------------------------------------
# im2col / col2im (columns laid out (C*kh*kw, N*Ho*Wo))
# --------------------------------------------------------------------------

def _pad_channels_first(x, ph, pw):
    """Zero-padded copy of x with channels first: (C, N, Hp, Wp).

    One copy does both jobs (padding and the NCHW -> CNHW transpose that puts
    a channel's pixels next to each other, as the rows of ``cols`` want).
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    x_pad = xp.zeros((C, N, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
    x_pad[:, :, ph:ph + H, pw:pw + W] = x.transpose(1, 0, 2, 3)
    return x_pad


def _window_view(grid, kh, kw, sh, sw, Ho, Wo):
    """The receptive fields of a (C, N, Hp, Wp) array as a (C, kh, kw, N, Ho, Wo) view.

    view[c, i, j, n, y, x] = grid[c, n, y*sh + i, x*sw + j]: no data is copied,
    the same memory is just read with other strides (an offset of i rows is i
    row-strides, an output step of y rows is y*sh row-strides).
    """
    sc, sn, sy, sx = grid.strides
    C, N = grid.shape[:2]
    return as_strided(grid, (C, kh, kw, N, Ho, Wo), (sc, sy, sx, sn, sy * sh, sx * sw))


def im2col(x, kh, kw, stride, padding):
    """Column matrix of x: cols[(c, i, j), (n, y, x)] = x_pad[n, c, y*sh + i, x*sw + j].

    x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo). Built by copying a strided view
    (no Python loop at all); on a GPU by one kernel launch (kernels/cuda.py).
    """
    xp = get_array_module(x)
    if xp is not numpy:
        return cuda.im2col(x, kh, kw, stride, padding)
    (sh, sw), (ph, pw) = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if ph or pw:
        grid = _pad_channels_first(x, ph, pw)
    else:
        grid = x.transpose(1, 0, 2, 3)  # no padding: a view is enough (1x1 convs)
    # The reshape of the overlapping view is where the copy happens.
    return _window_view(grid, kh, kw, sh, sw, Ho, Wo).reshape(C * kh * kw, N * Ho * Wo)


def _col2im_padded(cols, x_shape, kh, kw, sh, sw, ph, pw):
    """Adjoint of im2col, before cropping: dx_pad in channels-first layout (C, N, Hp, Wp)."""
    xp = get_array_module(cols)
    N, C, H, W = x_shape
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    cols = cols.reshape(C, kh, kw, N, Ho, Wo)
    dx_pad = xp.zeros((C, N, Hp, Wp), dtype=cols.dtype)
    # Windows overlap, so gradients must be ADDED. Loop over the kh*kw kernel
    # offsets only: for a fixed (i, j) the targets x_pad[:, :, y*sh+i, x*sw+j]
    # are all distinct, so one vectorized += per offset is exact.
    for i in range(kh):
        for j in range(kw):
            dx_pad[:, :, i:i + sh * Ho:sh, j:j + sw * Wo:sw] += cols[:, i, j]
    return dx_pad


def col2im(cols, x_shape, kh, kw, stride, padding, out=None):
    """Adjoint of :func:`im2col`: add every column entry back onto its pixel.

    cols (C*kh*kw, N*Ho*Wo) -> dx (N, C, H, W); where windows overlap their
    contributions add up. Written into ``out`` if given (an array of that
    shape), else into a new array. On a GPU one kernel launch (kernels/cuda.py).
    """
    xp = get_array_module(cols)
    if xp is not numpy:
        return cuda.col2im(cols, x_shape, kh, kw, stride, padding, out)
    (sh, sw), (ph, pw) = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    N, C, H, W = x_shape
    dx = _col2im_padded(cols, x_shape, kh, kw, sh, sw, ph, pw)[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3)
    if out is None:
        return xp.ascontiguousarray(dx)
    if tuple(out.shape) != tuple(dx.shape):
        raise ValueError(f"col2im: expected out of shape {tuple(dx.shape)}, got shape {tuple(out.shape)}")
    out[...] = dx
    return out


# --------------------------------------------------------------------------
# "same" convolutions at stride 1: columns as shifted copies of one line
# --------------------------------------------------------------------------
def _is_same(kh, kw, stride, padding):
    """Stride 1 with output size = input size (2*ph = kh - 1, 2*pw = kw - 1).

    All of ResNet's stride-1 convolutions are like this (3x3 padding 1, 1x1
    padding 0), and so is the convolution that gives their dx (see
    :func:`_backward_chunk`). They take the fast route of :func:`_same_im2col`.
    """
    return stride == (1, 1) and 2 * padding[0] == kh - 1 and 2 * padding[1] == kw - 1


def _same_line(x, ph, pw, name):
    """x (n, C, H, W) as one line per channel, framed by zeros: (C, lead + n*H*W + lead).

    Pixel (m, y, x) of channel c sits at line[c, lead + m*H*W + y*W + x],
    with lead = ph*W + pw. One copy with long contiguous runs (an image's
    plane). A scratch array of this thread, valid until its next call with
    the same ``name``.
    """
    xp = get_array_module(x)
    n, C, H, W = x.shape
    lead, P = ph * W + pw, n * H * W
    line = scratch(xp, name, (C, lead + P + lead), x.dtype)
    line[:, :lead] = 0
    line[:, lead + P:] = 0
    line[:, lead:lead + P].reshape(C, n, H * W)[...] = x.reshape(n, C, H * W).transpose(1, 0, 2)
    return line


def _wrapped_columns(W, shift):
    """The image columns a kernel column reading pixel x + shift reaches only by wrapping.

    On the line, the pixel left of x = 0 is the last pixel of the row above.
    So with shift = -1 (the left column of a 3x3 kernel) column W-1 is read
    only by the windows at x = 0, which should see a padding zero; with
    shift = +1 column 0 is read only from x = W-1. For W = 4: shift -1 ->
    columns 3:4, shift +1 -> columns 0:1, shift 0 -> none.
    """
    if shift < 0:
        return slice(max(0, W + shift), W)
    return slice(0, min(W, shift))


def _same_cols(line, kh, kw, n, H, W):
    """Columns (C*kh*kw, n*H*W) of a stride-1 "same" convolution, from :func:`_same_line`.

    Output position q = m*H*W + y*W + x looks through kernel offset (i, j) at
    pixel (y + i - ph, x + j - pw) of the same image, which is at q + s on
    the line, s = lead + (i - ph)*W + (j - pw): a pure shift. So row (c, i, j)
    of the column matrix is the contiguous slice line[c, s : s + n*H*W], and
    the whole matrix is a copy of a strided view -- long contiguous rows.

    The shift is right only inside the image. A window hanging over the left
    edge (x + j - pw < 0) reads the end of the row above instead of a padding
    zero: so while the rows of kernel column j are copied, the image columns
    that j can only reach that way are zeroed on the line (and put back
    after). A window hanging over the top or bottom edge reads the previous
    or next image (or the zero frame): those entries of ``cols`` are zeroed
    afterwards, a few contiguous slices.
    """
    xp = get_array_module(line)
    C = line.shape[0]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    lead, P = ph * W + pw, n * H * W
    if kh == kw == 1:
        return line[:, :P]  # a 1x1 kernel: the line is the column matrix
    cols = scratch(xp, "cols", (C * kh * kw, P), line.dtype)
    by_offset = cols.reshape(C, kh, kw, P)
    pixels = line[:, lead:lead + P].reshape(C, n * H, W)  # by image row
    channel_stride, item_stride = line.strides
    for j in range(kw):
        wrapped = _wrapped_columns(W, j - pw)
        saved = pixels[:, :, wrapped].copy()
        pixels[:, :, wrapped] = 0
        # row (c, i) of kernel column j: line[c, i*W + j : ... + P], one strided view
        rows_j = as_strided(line[:, j:], (C, kh, P), (channel_stride, W * item_stride, item_stride))
        by_offset[:, :, j] = rows_j  # the copy
        pixels[:, :, wrapped] = saved
    by_pixel = cols.reshape(C, kh, kw, n, H, W)
    for i in range(kh):  # rows y with y + i - ph outside 0..H-1
        by_pixel[:, i, :, :, :max(0, ph - i)] = 0
        by_pixel[:, i, :, :, max(0, H + ph - i):] = 0
    return cols


def _same_im2col(x, kh, kw):
    """im2col of a stride-1 "same" convolution: (C*kh*kw, n*H*W), a scratch array."""
    n, _, H, W = x.shape
    return _same_cols(_same_line(x, (kh - 1) // 2, (kw - 1) // 2, "line"), kh, kw, n, H, W)


# --------------------------------------------------------------------------
# fast path
# --------------------------------------------------------------------------
def _batch_chunks(xp, N, bytes_per_image):
    """Slices of the batch whose column matrix is about CHUNK_BYTES (all of it on GPU)."""
    return batch_chunks(xp, N, bytes_per_image, CHUNK_BYTES)


def _forward_chunk(x, w_mat, kh, kw, stride, padding, out_hw):
    """Convolution of one chunk of images: a (n, F, Ho, Wo) view, valid until this
    thread's next call (it may live in a scratch array: copy it out)."""
    xp = get_array_module(x)
    n, F = x.shape[0], w_mat.shape[0]
    Ho, Wo = out_hw
    if xp is numpy and _is_same(kh, kw, stride, padding):  # (a GPU: im2col's one kernel)
        cols = _same_im2col(x, kh, kw)
        out_mat = scratch(xp, "out", (F, cols.shape[1]), xp.result_type(w_mat, cols))
        xp.matmul(w_mat, cols, out=out_mat)
    else:
        out_mat = w_mat @ im2col(x, kh, kw, stride, padding)
    return out_mat.reshape(F, n, Ho, Wo).transpose(1, 0, 2, 3)


def _backward_chunk(dout, x, w, stride, padding, dx):
    """Gradients for one chunk: writes dx (n, C, H, W), this chunk's slice of the
    whole dx (unless dx is None), and returns dw_mat (F, C*kh*kw), this chunk's
    share of dw."""
    xp = get_array_module(dout, x)
    n, F, Ho, Wo = dout.shape
    C, H, W = x.shape[1:]
    kh, kw = w.shape[2:]
    (ph, pw) = padding
    if xp is not numpy or not _is_same(kh, kw, stride, padding):
        cols = im2col(x, kh, kw, stride, padding)
        dout_mat = dout.transpose(1, 0, 2, 3).reshape(F, -1)
        # dw_mat = dout_mat @ cols.T, computed as (cols @ dout_mat.T).T: the
        # same GEMM, in the orientation OpenBLAS runs faster (a tall-skinny
        # output instead of a short-wide one; docs/performance.md).
        dw_mat = (cols @ dout_mat.T).T
        if dx is not None:
            col2im(w.reshape(F, -1).T @ dout_mat, x.shape, kh, kw, stride, padding, out=dx)
        return dw_mat

    # "Same" convolution: dx is itself a "same" convolution, of dout with the
    # kernel flipped and its in/out channels swapped (docs/backward/conv2d.md),
    # so no col2im is needed: dout gets the line layout of x, and its columns.
    P = n * H * W
    dline = _same_line(dout, ph, pw, "dline")
    # dout's columns give dw too, so x's columns need not be rebuilt:
    #   dw[f, c, i, j] = sum_q dcols[(f, kh-1-i, kw-1-j), q] * x[c, q]
    # except with few input channels (a stem conv on RGB images): then x's
    # columns are cheap, and that product, with only C columns, runs slowly.
    dw_from_dcols = C >= F
    if not dw_from_dcols:
        lead = ph * W + pw
        dout_mat = dline[:, lead:lead + P]  # (F, n*H*W): dout[m, f, y, x] at m*H*W + y*W + x
        dw_mat = (_same_im2col(x, kh, kw) @ dout_mat.T).T  # = dout_mat @ cols.T, faster (above)
    if dw_from_dcols or dx is not None:
        # (F*kh*kw, n*H*W), in the scratch that held x's columns above (used up by then)
        dcols = _same_cols(dline, kh, kw, n, H, W)
    if dw_from_dcols:
        x_mat = _same_line(x, 0, 0, "line")  # (C, n*H*W): x.transpose(1, 0, 2, 3), reshaped
        dw_flipped = (dcols @ x_mat.T).reshape(F, kh, kw, C)  # [f, kh-1-i, kw-1-j, c]
        dw_mat = dw_flipped[:, ::-1, ::-1].transpose(0, 3, 1, 2).reshape(F, C * kh * kw)
    if dx is not None:
        w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, F * kh * kw)
        dx_mat = scratch(xp, "out", (C, P), xp.result_type(w_flip, dcols))
        xp.matmul(w_flip, dcols, out=dx_mat)
        dx[...] = dx_mat.reshape(C, n, H, W).transpose(1, 0, 2, 3)
    return dw_mat


def _bytes_per_image(C, kh, kw, out_hw, itemsize):
    """Column-matrix bytes for one image: C*kh*kw rows of Ho*Wo positions."""
    return C * kh * kw * out_hw[0] * out_hw[1] * itemsize


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """Convolution by im2col + one GEMM (per batch chunk). Returns (out, cache).

    x (N, C, H, W), w (F, C, kh, kw), b (F,) or None; stride and padding are
    ints or (row, column) pairs. out (N, F, Ho, Wo), same dtype as x and w.
    """
    xp = get_array_module(x, w, b)
    stride, padding, (Ho, Wo) = conv_geometry(x, w, b, stride, padding)
    N, F, kh, kw = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    w_mat = w.reshape(F, -1)
    out = xp.empty((N, F, Ho, Wo), dtype=xp.result_type(x, w))
    per_image = _bytes_per_image(x.shape[1], kh, kw, (Ho, Wo), x.itemsize)

    def one_chunk(chunk):  # each chunk writes its own slice of out
        out[chunk] = _forward_chunk(x[chunk], w_mat, kh, kw, stride, padding, (Ho, Wo))
        if b is not None:
            out[chunk] += b.reshape(1, F, 1, 1)  # while the chunk is in cache

    map_chunks(one_chunk, _batch_chunks(xp, N, per_image))  # on all CPU cores
    return out, (x, w, b, stride, padding)


def conv2d_backward(dout, cache, input_grad=True):
    """Gradients of :func:`conv2d_forward`. Returns (dx, dw, db); db is None without bias.

    ``input_grad=False`` skips dx (returned as None): a network's first
    convolution reads the images, whose gradient training does not need, and
    dx is the larger part of its backward.
    """
    x, w, b, stride, padding = cache
    xp = get_array_module(dout, x, w)
    N, F, kh, kw = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    stride, padding, out_hw = conv_geometry(x, w, b, stride, padding)
    check_conv_dout(dout, (N, F) + out_hw)
    dx = xp.empty(x.shape, dtype=xp.result_type(dout, w)) if input_grad else None
    rows = x.shape[1]  # x's columns, C*kh*kw rows
    if _is_same(kh, kw, stride, padding):
        rows = F  # the largest columns this path builds are dout's, F*kh*kw rows
    per_image = _bytes_per_image(rows, kh, kw, out_hw, x.itemsize)

    def one_chunk(chunk):  # writes its slice of dx, returns its share of dw
        return _backward_chunk(dout[chunk], x[chunk], w, stride, padding,
                               None if dx is None else dx[chunk])

    dw_mat, *more = map_chunks(one_chunk, _batch_chunks(xp, N, per_image))
    for dw_chunk in more:
        dw_mat += dw_chunk  # dw sums over the batch, so chunks add (in a fixed order)
    db = dout.sum(axis=(0, 2, 3)) if b is not None else None
    return dx, dw_mat.reshape(w.shape), db
