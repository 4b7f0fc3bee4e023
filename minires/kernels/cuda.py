"""Hand-written CUDA kernels for the GPU hot spots, each one launch.

On CuPy the xp code of ``conv.py`` / ``batchnorm.py`` / ``activation.py`` is
correct but costs many kernel launches per op, each a full pass over memory:

* ``im2col`` replaces :func:`minires.functional.conv.im2col` (a zero fill and
  a copy per kernel offset, each a pass over memory);
* ``col2im`` replaces :func:`minires.functional.conv.col2im` (a zero fill, one
  ``+=`` per kernel offset and a cropping copy); it *gathers*, so it needs no
  atomics;
* ``bn_stats`` + ``bn_normalize`` replace the BatchNorm forward in training
  (mean, var, inv_std, the running-stat update, num_batches_tracked, centre,
  scale, shift), ``bn_backward_sums`` + ``bn_backward_dx`` its backward
  (``batchnorm2d_forward`` / ``batchnorm2d_backward``);
* ``relu_backward`` fuses ``dout * (out > 0)`` (no mask array);
* ``softmax_xent_forward`` / ``softmax_xent_backward`` replace the softmax
  cross-entropy of ``functional/loss.py``;
* ``sgd_momentum_step`` is :func:`minires.functional.optim.sgd_step` with
  momentum for one parameter (weight decay, velocity and step in one pass);
* ``zero_many``, ``sgd_momentum_step_many`` and ``flag_nonfinite_many`` work on
  *all* the parameters or gradients of a model in one launch (instead of one
  or more per array) for ``zero_grad``, the SGD step and the NaN check. They
  get the arrays as a table of device addresses (:func:`_address_table`).

docs/gpu.md counts the launches each one replaces and what that bought.

The kernels that update arrays in place mark them ``INOUT``.

Every kernel walks its outputs with a grid-stride loop and every output is
written by exactly one thread, so any launch shape gives a correct answer --
including one block of one thread, which is how ``tests/cuda_emulator.py``
runs this very source on the CPU. (Element-wise kernels give the same bits
for any shape; reductions add in a thread-count-dependent order, so their
float32 rounding varies with it.) The element type ``T`` is float or double
(:func:`kernel_source`). CuPy is imported only when a kernel is launched.
"""
import functools

import numpy

from ..backend import get_array_module
from ..functional.conv import _pair

#: Threads per block of the element-wise kernels.
THREADS = 256
#: Most blocks per launch: enough to fill any current GPU several times over;
#: past that the grid-stride loop gives each thread more elements.
MAX_BLOCKS = 8192
#: Threads per block of the per-channel reductions (one block per channel);
#: also the size of their shared-memory buffer, so never launch more. The
#: most a block can have: ResNet-20's first stage has only 16 channels, so
#: only 16 blocks, and more threads per block shrink each thread's share of
#: a channel's values (docs/gpu.md times it).
REDUCE_THREADS = 1024

_CTYPES = {"float32": "float", "float64": "double"}

_SOURCE = r"""
// ---- im2col: cols[(c, i, j), (n, y, x)] = x_pad[n, c, y*sh + i, x*sw + j] ----
// One thread per entry of cols (C*kh*kw, N*Ho*Wo); consecutive threads write
// consecutive columns, so the writes are coalesced.
extern "C" __global__ void im2col(const T* x, T* cols, int N, int C, int H, int W,
                                  int kh, int kw, int sh, int sw, int ph, int pw, int Ho, int Wo)
{
    const long long P = (long long)N * Ho * Wo;            // columns = output positions
    const long long total = (long long)C * kh * kw * P;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int row = (int)(t / P), col = (int)(t % P);  // row = (c, i, j), col = (n, y, x)
        const int j = row % kw, i = row / kw % kh, c = row / (kw * kh);
        const int xo = col % Wo, yo = col / Wo % Ho, n = col / (Wo * Ho);
        const int yi = yo * sh + i - ph, xi = xo * sw + j - pw;  // pixel in the unpadded x
        const bool inside = yi >= 0 && yi < H && xi >= 0 && xi < W;
        cols[t] = inside ? x[(((long long)n * C + c) * H + yi) * W + xi] : (T)0;
    }
}

// ---- col2im, the adjoint: dx[n, c, yi, xi] = sum of the cols entries read from it ----
// One thread per pixel of dx (N, C, H, W), which gathers: pixel p (in padded
// coordinates p + ph) was read at kernel row i by output row yo iff
// p + ph - i = yo * sh with 0 <= yo < Ho; the same for columns. No atomics.
extern "C" __global__ void col2im(const T* cols, T* dx, int N, int C, int H, int W,
                                  int kh, int kw, int sh, int sw, int ph, int pw, int Ho, int Wo)
{
    const long long P = (long long)N * Ho * Wo;
    const long long total = (long long)N * C * H * W;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int xi = t % W, yi = t / W % H, c = t / ((long long)W * H) % C;
        const int n = t / ((long long)W * H * C);
        T sum = 0;
        for (int i = 0; i < kh; ++i) {
            const int ys = yi + ph - i;                    // = yo * sh if row i of window yo hit yi
            if (ys < 0 || ys % sh != 0 || ys / sh >= Ho) continue;
            for (int j = 0; j < kw; ++j) {
                const int xs = xi + pw - j;
                if (xs < 0 || xs % sw != 0 || xs / sw >= Wo) continue;
                const long long row = ((long long)c * kh + i) * kw + j;
                sum += cols[row * P + ((long long)n * Ho + ys / sh) * Wo + xs / sw];
            }
        }
        dx[t] = sum;
    }
}

// ---- block_sum: the sum of v over the threads of a block ----
// Tree reduction in shared memory: fold the upper half of the n partial sums
// onto the lower half until one is left. half = ceil(n / 2), so n need not be
// a power of two (blockDim 1 does no folding). All threads of the block must
// call it (it synchronizes); partial holds at least blockDim.x values.
__device__ T block_sum(T* partial, T v)
{
    partial[threadIdx.x] = v;
    __syncthreads();
    for (unsigned n = blockDim.x; n > 1; ) {
        const unsigned half = (n + 1) / 2;
        if (threadIdx.x < n - half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
        n = half;
    }
    const T total = partial[0];
    __syncthreads();                                       // all have read it before reuse
    return total;
}

// ---- BatchNorm training statistics over the M = N*L values of each channel c ----
// mean[c] and var = the biased variance, then, in place:
//   inv_std[c]      = 1 / sqrt(var + eps)
//   running_mean[c] = keep * running_mean[c] + momentum * mean[c]
//   running_var[c]  = keep * running_var[c]  + var_weight * var
// (keep = 1 - momentum, var_weight = momentum * M / (M - 1): the unbiased
// variance) and, if count, the module's num_batches_tracked (batches[0] += 1).
// x is (N, C, L) with L = H*W; value k of channel c is x[(k / L) * C*L + c*L + k % L].
// One block per channel (grid-stride over channels); its threads stride over
// the values, so neighbouring threads read neighbouring addresses. Two passes:
// the mean, then the mean of (x - mean)^2 (biased variance), which stays
// accurate when |mean| >> std, unlike E[x^2] - mean^2. One launch, also for
// the small (C,)-array updates that would otherwise each be a launch.
extern "C" __global__ void bn_stats(const T* x, T* mean, T* inv_std,
                                    INOUT T* running_mean, INOUT T* running_var,
                                    INOUT long long* batches, int N, int C, int L, T eps, T keep,
                                    T momentum, T var_weight, int count)
{
    __shared__ T partial[REDUCE_THREADS];
    if (count && blockIdx.x == 0 && threadIdx.x == 0) batches[0] += 1;
    const long long M = (long long)N * L;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        const T* xc = x + (long long)c * L;
        T s = 0;
        for (long long k = threadIdx.x; k < M; k += blockDim.x) s += xc[k / L * C * L + k % L];
        const T mu = block_sum(partial, s) / (T)M;
        s = 0;
        for (long long k = threadIdx.x; k < M; k += blockDim.x) {
            const T d = xc[k / L * C * L + k % L] - mu;
            s += d * d;
        }
        const T sq = block_sum(partial, s);
        if (threadIdx.x == 0) {
            const T var = sq / (T)M;
            mean[c] = mu;
            inv_std[c] = (T)1 / sqrt(var + eps);
            running_mean[c] = keep * running_mean[c] + momentum * mu;
            running_var[c] = keep * running_var[c] + var_weight * var;
        }
    }
}

// ---- BatchNorm inv_std in eval mode, from the running variance ----
extern "C" __global__ void bn_eval_inv_std(const T* running_var, T* inv_std, int C, T eps)
{
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x)
        inv_std[c] = (T)1 / sqrt(running_var[c] + eps);
}

// ---- x_hat = (x - mean) * inv_std,  out = gamma * x_hat + beta (element-wise) ----
extern "C" __global__ void bn_normalize(const T* x, const T* mean, const T* inv_std,
                                        const T* gamma, const T* beta, T* x_hat, T* out,
                                        int N, int C, int L)
{
    const long long total = (long long)N * C * L;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int c = t / L % C;                           // t = (n, c, l)
        const T xh = (x[t] - mean[c]) * inv_std[c];
        x_hat[t] = xh;
        out[t] = gamma[c] * xh + beta[c];
    }
}

// ---- BatchNorm backward sums: dbeta[c] = sum dout, dgamma[c] = sum dout * x_hat ----
// Same layout and block-per-channel scheme as bn_stats.
extern "C" __global__ void bn_backward_sums(const T* dout, const T* x_hat, T* dgamma, T* dbeta,
                                            int N, int C, int L)
{
    __shared__ T partial[REDUCE_THREADS];
    const long long M = (long long)N * L;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        T sd = 0, sdx = 0;
        for (long long k = threadIdx.x; k < M; k += blockDim.x) {
            const long long t = k / L * C * L + (long long)c * L + k % L;
            sd += dout[t];
            sdx += dout[t] * x_hat[t];
        }
        const T db = block_sum(partial, sd), dg = block_sum(partial, sdx);
        if (threadIdx.x == 0) { dbeta[c] = db; dgamma[c] = dg; }
    }
}

// ---- BatchNorm dx (element-wise), M = N*L values per channel ----
// training: dx = gamma * inv_std * (dout - x_hat * dgamma / M - dbeta / M)
//           (the last two terms are the gradient through the batch mean and var)
// eval:     dx = gamma * inv_std * dout    (running stats are constants)
extern "C" __global__ void bn_backward_dx(const T* dout, const T* x_hat, const T* gamma,
                                          const T* inv_std, const T* dgamma, const T* dbeta,
                                          T* dx, int N, int C, int L, int training)
{
    const long long total = (long long)N * C * L;
    const T M = (T)((long long)N * L);
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int c = t / L % C;
        const T scale = gamma[c] * inv_std[c];
        dx[t] = training ? scale * (dout[t] - x_hat[t] * (dgamma[c] / M) - dbeta[c] / M)
                         : scale * dout[t];
    }
}

// ---- SGD with momentum, one parameter updated in place (optim.SGD._update) ----
// g = grad + weight_decay * p;  buf = momentum * buf + g  (buf = g at the first step);
// p -= lr * (nesterov ? g + momentum * buf : buf). One launch instead of one per operation.
extern "C" __global__ void sgd_momentum_step(INOUT T* p, const T* grad, INOUT T* buf, long long n,
                                             T lr, T momentum, T weight_decay, int nesterov, int first)
{
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)blockDim.x * gridDim.x) {
        const T g = weight_decay != 0 ? grad[t] + weight_decay * p[t] : grad[t];
        const T b = first ? g : momentum * buf[t] + g;  // (buf is not read at the first step)
        buf[t] = b;
        p[t] -= lr * (nesterov ? g + momentum * b : b);
    }
}

// ---- Many arrays in one launch ----
// The arrays are given as a table of device addresses, ptrs[k], and the
// running total of their sizes: starts[k] = elements in arrays 0..k-1, so
// starts[n] is the size of all n arrays together. The kernels walk that
// concatenation: element t of it is element t - starts[k] of array k, where
// k is found by binary search (a model has tens of arrays, so a few steps).
__device__ int array_of(const long long* starts, int n, long long t)
{
    int lo = 0, hi = n - 1;                                // starts[lo] <= t < starts[hi + 1]
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (starts[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// ---- zero_grad: every array set to 0 ----
extern "C" __global__ void zero_many(const unsigned long long* ptrs, const long long* starts, int n)
{
    const long long total = starts[n];
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int k = array_of(starts, n, t);
        ((T*)ptrs[k])[t - starts[k]] = 0;
    }
}

// ---- sgd_momentum_step (above) for every parameter at once ----
// params[k], grads[k], bufs[k]: the addresses of parameter k, its gradient and its velocity.
extern "C" __global__ void sgd_momentum_step_many(const unsigned long long* params,
                                                  const unsigned long long* grads,
                                                  const unsigned long long* bufs,
                                                  const long long* starts, int n, T lr, T momentum,
                                                  T weight_decay, int nesterov, int first)
{
    const long long total = starts[n];
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int k = array_of(starts, n, t);
        const long long i = t - starts[k];
        T* p = (T*)params[k];
        T* buf = (T*)bufs[k];
        const T grad = ((const T*)grads[k])[i];
        const T g = weight_decay != 0 ? grad + weight_decay * p[i] : grad;
        const T b = first ? g : momentum * buf[i] + g;
        buf[i] = b;
        p[i] -= lr * (nesterov ? g + momentum * b : b);
    }
}

// ---- NaN check: flag[0] = 1 if any element of any array is NaN or +-inf ----
// Threads that find one all write the same 1, so their order does not
// matter. flag[0] must be 0 before the launch.
extern "C" __global__ void flag_nonfinite_many(const unsigned long long* ptrs, const long long* starts,
                                               int n, INOUT int* flag)
{
    const long long total = starts[n];
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int k = array_of(starts, n, t);
        if (!isfinite(((const T*)ptrs[k])[t - starts[k]])) flag[0] = 1;
    }
}

// ---- softmax cross-entropy forward, one row (example) per thread ----
// With m = max_k z[n, k] and lse = log sum_k exp(z[n, k] - m) (log-sum-exp: exp
// never overflows, log never sees 0), as loss.py:
//   probs[n, k] = exp(z[n, k] - m - lse),   losses[n] = -(z[n, y_n] - m - lse)
// The batch's loss is the mean of losses (one more launch). Labels must lie
// in [0, K): the caller checks them first.
extern "C" __global__ void softmax_xent_forward(const T* logits, const long long* labels, T* probs,
                                                T* losses, int N, int K)
{
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += blockDim.x * gridDim.x) {
        const T* z = logits + (long long)n * K;
        T m = z[0];
        for (int k = 1; k < K; ++k) m = z[k] > m ? z[k] : m;
        T sum = 0;
        for (int k = 0; k < K; ++k) sum += exp(z[k] - m);
        const T lse = log(sum);
        for (int k = 0; k < K; ++k) probs[(long long)n * K + k] = exp(z[k] - m - lse);
        losses[n] = -(z[labels[n]] - m - lse);
    }
}

// ---- softmax cross-entropy backward: dlogits = (probs - onehot(labels)) * scale ----
// scale = dloss / N (element-wise over the N*K entries).
extern "C" __global__ void softmax_xent_backward(const T* probs, const long long* labels, T* dlogits,
                                                 int N, int K, T scale)
{
    const long long total = (long long)N * K;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int n = t / K, k = t % K;
        dlogits[t] = (probs[t] - (k == labels[n] ? (T)1 : (T)0)) * scale;
    }
}

// ---- ReLU backward: dx = dout * (out > 0) ----
// A multiply rather than a select, as the xp version: a NaN in dout stays
// visible even where the unit is off.
extern "C" __global__ void relu_backward(const T* dout, const T* out, T* dx, long long n)
{
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)blockDim.x * gridDim.x)
        dx[t] = dout[t] * (T)(out[t] > 0);
}
"""


def kernel_source(dtype):
    """The CUDA source of all kernels for float32 or float64 (``T`` = float / double).

    This exact string is what :mod:`cupy` compiles and what the CPU emulator
    (tests/cuda_emulator.py) compiles with g++.
    """
    name = numpy.dtype(dtype).name
    if name not in _CTYPES:
        raise ValueError(f"CUDA kernels: expected float32 or float64, got dtype {name}")
    return (f"typedef {_CTYPES[name]} T;\n#define REDUCE_THREADS {REDUCE_THREADS}\n"
            "#define INOUT  // marks an array a kernel reads and updates in place\n" + _SOURCE)


# --------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------
def elementwise_grid(n):
    """(blocks, threads) for an element-wise kernel over n outputs (0 blocks: nothing to do)."""
    return min(-(-n // THREADS), MAX_BLOCKS), THREADS


def channel_grid(channels):
    """(blocks, threads) for a per-channel reduction: one block per channel."""
    return min(channels, MAX_BLOCKS), REDUCE_THREADS


@functools.lru_cache(maxsize=None)
def _module(dtype_name):
    import cupy  # only here: the module must import without CuPy
    return cupy.RawModule(code=kernel_source(dtype_name))


@functools.lru_cache(maxsize=None)
def _kernel(dtype_name, name):
    """The compiled kernel, looked up once (CuPy makes a new RawKernel at every get_function)."""
    return _module(dtype_name).get_function(name)


def kernel_args(args):
    """Python ints as numpy.int32 (C ``int``); arrays and numpy scalars unchanged.

    CuPy passes a numpy scalar with its own size, so the C type is explicit.
    """
    return tuple(numpy.int32(a) if isinstance(a, int) else a for a in args)


def _launch(name, dtype, grid, block, args):
    """Run kernel ``name`` of the ``dtype`` source on (grid, block) blocks x threads.

    The only place that talks to CuPy (the tests swap in the CPU emulator here).
    """
    if any(isinstance(a, numpy.ndarray) for a in args):
        raise TypeError(
            f"CUDA kernel {name}: expected CuPy arrays, got NumPy arrays; on the CPU use the "
            "NumPy functions of minires.functional (or minires.backend.to_device first)"
        )
    if grid == 0:
        return  # empty output: a launch of 0 blocks would be an error
    _kernel(numpy.dtype(dtype).name, name)((grid,), (block,), kernel_args(args))


def _inputs(name, *arrays):
    """The xp module and C-contiguous copies (no-op views if already) of same-dtype float arrays."""
    xp = get_array_module(*arrays)
    dtype = arrays[0].dtype
    if dtype.name not in _CTYPES or any(a.dtype != dtype for a in arrays):
        raise ValueError(
            f"{name}: expected float32 or float64 arrays of one dtype, got dtypes "
            f"{[a.dtype.name for a in arrays]}"
        )
    return xp, [xp.ascontiguousarray(a) for a in arrays]


def _nchw(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name}: expected an array of shape (N, C, H, W), got shape {tuple(x.shape)}")
    return x.shape


def _per_channel(name, C, **vectors):
    for label, v in vectors.items():
        if tuple(v.shape) != (C,):
            raise ValueError(f"{name}: expected {label} of shape ({C},), got shape {tuple(v.shape)}")


# --------------------------------------------------------------------------
# wrappers (CuPy arrays in, CuPy arrays out; same contracts as the xp code)
# --------------------------------------------------------------------------
def conv_geometry(x_shape, kh, kw, stride, padding):
    """The int arguments (N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo) of im2col / col2im."""
    (sh, sw), (ph, pw) = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    (kh, _), (kw, _) = _pair(kh, "kernel height", 1), _pair(kw, "kernel width", 1)  # plain ints:
    # a NumPy integer would reach the kernel at its own size, not as a C int
    if len(x_shape) != 4:
        raise ValueError(f"im2col/col2im: expected x_shape (N, C, H, W), got {tuple(x_shape)}")
    N, C, H, W = (int(d) for d in x_shape)
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if kh < 1 or kw < 1 or Ho < 1 or Wo < 1:
        raise ValueError(
            f"im2col: kernel {kh}x{kw} does not fit input {H}x{W} with padding {(ph, pw)}"
        )
    return N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo


def im2col(x, kh, kw, stride, padding):
    """x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo), as :func:`minires.functional.conv.im2col`.

    One launch. Returns a new C-contiguous array of x's dtype.
    """
    xp, (x,) = _inputs("im2col", x)
    geometry = conv_geometry(_nchw("im2col x", x), kh, kw, stride, padding)
    N, C, *_, Ho, Wo = geometry
    cols = xp.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    _launch("im2col", x.dtype, *elementwise_grid(cols.size), (x, cols) + geometry)
    return cols


def col2im(cols, x_shape, kh, kw, stride, padding, out=None):
    """cols (C*kh*kw, N*Ho*Wo) -> dx of shape x_shape, as :func:`minires.functional.conv.col2im`.

    One launch, no atomics (each thread sums the entries of one pixel). Returns a
    new C-contiguous (N, C, H, W) array of cols' dtype, or writes ``out`` (a
    C-contiguous array of that shape and dtype) and returns it.
    """
    xp, (cols,) = _inputs("col2im", cols)
    geometry = conv_geometry(tuple(x_shape), kh, kw, stride, padding)
    N, C, H, W, *_, Ho, Wo = geometry
    if tuple(cols.shape) != (C * kh * kw, N * Ho * Wo):
        raise ValueError(
            f"col2im: expected cols of shape ({C * kh * kw}, {N * Ho * Wo}) for x_shape "
            f"{tuple(x_shape)} and a {kh}x{kw} kernel, got shape {tuple(cols.shape)}"
        )
    if out is None:
        dx = xp.empty((N, C, H, W), dtype=cols.dtype)
    elif tuple(out.shape) != (N, C, H, W) or out.dtype != cols.dtype:
        raise ValueError(f"col2im: expected out of shape {(N, C, H, W)} and dtype {cols.dtype.name}, "
                         f"got shape {tuple(out.shape)} and dtype {out.dtype.name}")
    else:
        _inplace("col2im", out)
        dx = out
    _launch("col2im", cols.dtype, *elementwise_grid(dx.size), (cols, dx) + geometry)
    return dx


def _ncl(x):
    """The int arguments (N, C, L = H*W) of the BatchNorm kernels."""
    N, C, H, W = x.shape
    return N, C, H * W


def _inplace(name, *arrays):
    """Arrays a kernel updates in place must be C-contiguous (a copy would drop the update)."""
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: arrays updated in place must be C-contiguous, got strides {a.strides}")


def batchnorm_train_stats(x, running_mean, running_var, eps, momentum, num_batches_tracked=None):
    """The per-channel statistics of a training-mode BatchNorm forward, in one launch.

    x (N, C, H, W). Returns (mean, inv_std), (C,) arrays of x's dtype, with
    inv_std = 1 / sqrt(var + eps) from the biased variance; updates the
    running stats in place as ``batchnorm._update_running`` (momentum, and the
    unbiased variance ``var * m / (m - 1)`` for m = N*H*W values per channel),
    and ``num_batches_tracked`` if given (a 0-d int64 array, += 1).
    """
    xp, (x, _, _) = _inputs("batchnorm_train_stats", x, running_mean, running_var)
    N, C, H, W = _nchw("batchnorm_train_stats x", x)
    m = N * H * W
    if m < 2:
        raise ValueError(f"batchnorm_train_stats: training needs more than one value per channel, "
                         f"got x of shape {tuple(x.shape)}")
    _per_channel("batchnorm_train_stats", C, running_mean=running_mean, running_var=running_var)
    _inplace("batchnorm_train_stats", running_mean, running_var)
    count = num_batches_tracked is not None
    if count:
        if (not isinstance(num_batches_tracked, xp.ndarray) or num_batches_tracked.shape != ()
                or num_batches_tracked.dtype != numpy.int64):
            got = num_batches_tracked
            raise ValueError(f"batchnorm_train_stats: expected num_batches_tracked as a 0-d int64 array, "
                             f"got {type(got).__name__} of shape {getattr(got, 'shape', None)} "
                             f"and dtype {getattr(got, 'dtype', None)}")
        batches = num_batches_tracked
    else:
        batches = xp.empty((), dtype=numpy.int64)  # (not touched)
    T = x.dtype.type  # the scalars in the kernel's element type (a Python float is a double)
    mean, inv_std = xp.empty(C, dtype=x.dtype), xp.empty(C, dtype=x.dtype)
    _launch("bn_stats", x.dtype, *channel_grid(C),
            (x, mean, inv_std, running_mean, running_var, batches) + _ncl(x)
            + (T(eps), T(1 - momentum), T(momentum), T(momentum * m / (m - 1)), int(count)))
    return mean, inv_std


def batchnorm_eval_inv_std(running_var, eps):
    """inv_std = 1 / sqrt(running_var + eps), per channel, for eval mode. One launch."""
    xp, (running_var,) = _inputs("batchnorm_eval_inv_std", running_var)
    inv_std = xp.empty_like(running_var)
    C = running_var.shape[0]
    _launch("bn_eval_inv_std", running_var.dtype, *elementwise_grid(C),
            (running_var, inv_std, C, running_var.dtype.type(eps)))
    return inv_std


def batchnorm_normalize(x, mean, inv_std, gamma, beta):
    """x_hat = (x - mean) * inv_std and out = gamma * x_hat + beta, per channel.

    x (N, C, H, W); mean, inv_std, gamma, beta (C,). One launch; returns
    (x_hat, out), new C-contiguous arrays shaped and typed like x.
    """
    xp, (x, mean, inv_std, gamma, beta) = _inputs("batchnorm_normalize", x, mean, inv_std, gamma, beta)
    C = _nchw("batchnorm_normalize x", x)[1]
    _per_channel("batchnorm_normalize", C, mean=mean, inv_std=inv_std, gamma=gamma, beta=beta)
    x_hat, out = xp.empty_like(x), xp.empty_like(x)
    _launch("bn_normalize", x.dtype, *elementwise_grid(x.size),
            (x, mean, inv_std, gamma, beta, x_hat, out) + _ncl(x))
    return x_hat, out


def batchnorm_backward(dout, x_hat, gamma, inv_std, training):
    """BatchNorm backward, as :func:`minires.functional.batchnorm.batchnorm2d_backward`.

    dout, x_hat (N, C, H, W); gamma, inv_std (C,). Two launches (the per-channel
    sums, then dx). Returns (dx, dgamma, dbeta): dx a new C-contiguous array
    shaped like dout, dgamma and dbeta (C,), all of dout's dtype.
    """
    xp, (dout, x_hat, gamma, inv_std) = _inputs("batchnorm_backward", dout, x_hat, gamma, inv_std)
    C = _nchw("batchnorm_backward dout", dout)[1]
    if x_hat.shape != dout.shape:
        raise ValueError(
            f"batchnorm_backward: expected x_hat of shape {tuple(dout.shape)} (dout's), "
            f"got shape {tuple(x_hat.shape)}"
        )
    _per_channel("batchnorm_backward", C, gamma=gamma, inv_std=inv_std)
    dgamma, dbeta = xp.empty(C, dtype=dout.dtype), xp.empty(C, dtype=dout.dtype)
    _launch("bn_backward_sums", dout.dtype, *channel_grid(C), (dout, x_hat, dgamma, dbeta) + _ncl(dout))
    dx = xp.empty_like(dout)
    _launch("bn_backward_dx", dout.dtype, *elementwise_grid(dx.size),
            (dout, x_hat, gamma, inv_std, dgamma, dbeta, dx) + _ncl(dout) + (int(bool(training)),))
    return dx, dgamma, dbeta


def relu_backward(dout, out):
    """dx = dout * (out > 0), as :func:`minires.functional.activation.relu_backward`.

    One launch; returns a new C-contiguous array shaped and typed like dout.
    """
    xp, (dout, out) = _inputs("relu_backward", dout, out)
    if dout.shape != out.shape:
        raise ValueError(
            f"relu_backward: expected dout of shape {tuple(out.shape)} (the forward's output), "
            f"got shape {tuple(dout.shape)}"
        )
    dx = xp.empty_like(dout)
    _launch("relu_backward", dout.dtype, *elementwise_grid(dx.size), (dout, out, dx, numpy.int64(dx.size)))
    return dx


def _xent_labels(name, labels, N):
    if tuple(labels.shape) != (N,) or labels.dtype != numpy.int64:
        raise ValueError(f"{name}: expected int64 labels of shape ({N},), got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    return get_array_module(labels).ascontiguousarray(labels)


def softmax_cross_entropy_forward(logits, labels):
    """As :func:`minires.functional.loss.softmax_cross_entropy_forward`, labels already checked.

    logits (N, K) float, labels (N,) int64 in [0, K). Two launches (the rows,
    then their mean). Returns (loss as a 0-d array, (probs, labels)).
    """
    xp, (logits,) = _inputs("softmax_cross_entropy_forward", logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"softmax_cross_entropy_forward: expected logits (N, K) with N > 0, "
                         f"got shape {tuple(logits.shape)}")
    N, K = logits.shape
    labels = _xent_labels("softmax_cross_entropy_forward", labels, N)
    probs, losses = xp.empty_like(logits), xp.empty(N, dtype=logits.dtype)
    _launch("softmax_xent_forward", logits.dtype, *elementwise_grid(N), (logits, labels, probs, losses, N, K))
    return losses.mean(), (probs, labels)


def softmax_cross_entropy_backward(dloss, probs, labels):
    """dlogits = dloss * (probs - onehot(labels)) / N, one launch; dloss a Python number."""
    xp, (probs,) = _inputs("softmax_cross_entropy_backward", probs)
    N, K = probs.shape
    labels = _xent_labels("softmax_cross_entropy_backward", labels, N)
    dlogits = xp.empty_like(probs)
    _launch("softmax_xent_backward", probs.dtype, *elementwise_grid(probs.size),
            (probs, labels, dlogits, N, K, probs.dtype.type(dloss / N)))
    return dlogits


def sgd_momentum_step(p, grad, buf, lr, momentum, weight_decay, nesterov, first):
    """One SGD-with-momentum update of parameter ``p`` and its velocity ``buf``, in place.

    The update of :meth:`minires.optim.SGD._update` (momentum > 0), in one
    launch. ``first``: the first step, where buf starts as the gradient (its
    old contents are not read). p, grad, buf of one shape and dtype.
    """
    _, (_, grad, _) = _inputs("sgd_momentum_step", p, grad, buf)  # grad: a contiguous copy would do
    if not p.shape == grad.shape == buf.shape:
        raise ValueError(f"sgd_momentum_step: shapes differ: p {tuple(p.shape)}, "
                         f"grad {tuple(grad.shape)}, buf {tuple(buf.shape)}")
    _inplace("sgd_momentum_step", p, buf)
    T = p.dtype.type
    _launch("sgd_momentum_step", p.dtype, *elementwise_grid(p.size),
            (p, grad, buf, numpy.int64(p.size), T(lr), T(momentum), T(weight_decay),
             int(bool(nesterov)), int(bool(first))))


# --------------------------------------------------------------------------
# many arrays in one launch
# --------------------------------------------------------------------------
def fits_one_launch(arrays):
    """Whether the ``_many`` kernels below take these arrays: CuPy arrays of one
    float dtype, all C-contiguous. (Otherwise callers go array by array.)"""
    arrays = list(arrays)
    return (bool(arrays) and get_array_module(*arrays) is not numpy
            and len({a.dtype for a in arrays}) == 1 and arrays[0].dtype.name in _CTYPES
            and all(a.flags.c_contiguous for a in arrays))


def _address_table(name, arrays, distinct=False):
    """(xp, dtype, total size, device table of the arrays' addresses, device running sizes).

    The arrays must be C-contiguous and of one float dtype: the kernels read
    and write them through their addresses. ``distinct``: no array twice (two
    threads updating one element in place would lose an update). The tables
    are kept (:func:`_tables`), so a model whose arrays stay put uploads them once.
    """
    arrays = list(arrays)
    if not arrays:
        raise ValueError(f"{name}: expected at least one array")
    xp = get_array_module(*arrays)
    dtype = arrays[0].dtype
    if dtype.name not in _CTYPES or any(a.dtype != dtype for a in arrays):
        raise ValueError(f"{name}: expected float32 or float64 arrays of one dtype, got dtypes "
                         f"{sorted({a.dtype.name for a in arrays})}")
    _inplace(name, *arrays)
    # (NumPy arrays only in the tests, where the emulator runs kernels on host memory)
    addresses = tuple(a.ctypes.data if xp is numpy else a.data.ptr for a in arrays)
    written = [address for address, a in zip(addresses, arrays) if a.size]  # (empty ones: nothing)
    if distinct and len(set(written)) < len(written):
        raise ValueError(f"{name}: the same array appears twice (a shared parameter?)")
    sizes = tuple(int(a.size) for a in arrays)
    device = -1 if xp is numpy else xp.cuda.Device().id  # (a table lives on one GPU)
    ptrs, starts = _tables(xp, device, addresses, sizes)
    return xp, dtype, sum(sizes), ptrs, starts


@functools.lru_cache(maxsize=16)
def _tables(xp, device, addresses, sizes):
    """The address table and the running sizes as device arrays (one upload each)."""
    starts = numpy.concatenate([[0], numpy.cumsum(sizes)]).astype(numpy.int64)
    return xp.asarray(numpy.array(addresses, dtype=numpy.uint64)), xp.asarray(starts)


def zero_many(arrays):
    """Set every array to 0, in one launch (``Module.zero_grad`` on a GPU)."""
    _, dtype, total, ptrs, starts = _address_table("zero_many", arrays)
    _launch("zero_many", dtype, *elementwise_grid(total), (ptrs, starts, len(starts) - 1))


def sgd_momentum_step_many(params, grads, bufs, lr, momentum, weight_decay, nesterov, first):
    """:func:`sgd_momentum_step` on every (parameter, gradient, velocity) triple, in one launch.

    ``params``, ``grads``, ``bufs``: lists of arrays matched by position, each
    triple of one shape; params and bufs are updated in place.
    """
    params, grads, bufs = list(params), list(grads), list(bufs)
    if not len(params) == len(grads) == len(bufs):
        raise ValueError(f"sgd_momentum_step_many: {len(params)} parameters, {len(grads)} gradients, "
                         f"{len(bufs)} velocities")
    for p, g, b in zip(params, grads, bufs):
        if not p.shape == g.shape == b.shape:
            raise ValueError(f"sgd_momentum_step_many: shapes differ: p {tuple(p.shape)}, "
                             f"grad {tuple(g.shape)}, buf {tuple(b.shape)}")
    dtypes = {a.dtype for a in params + grads + bufs}
    if len(dtypes) > 1:
        raise ValueError(f"sgd_momentum_step_many: expected arrays of one dtype, got "
                         f"{sorted(d.name for d in dtypes)}")
    _, dtype, total, p_ptrs, starts = _address_table("sgd_momentum_step_many", params, distinct=True)
    g_ptrs = _address_table("sgd_momentum_step_many", grads)[3]
    b_ptrs = _address_table("sgd_momentum_step_many", bufs, distinct=True)[3]
    T = dtype.type
    _launch("sgd_momentum_step_many", dtype, *elementwise_grid(total),
            (p_ptrs, g_ptrs, b_ptrs, starts, len(params), T(lr), T(momentum), T(weight_decay),
             int(bool(nesterov)), int(bool(first))))


def flag_nonfinite_many(arrays):
    """A (1,) int32 device array: 1 if any of the arrays holds a NaN or inf, else 0.

    Two launches (zero the flag, check); reading the flag is then the one
    device -> host transfer the check needs.
    """
    xp, dtype, total, ptrs, starts = _address_table("flag_nonfinite_many", arrays)
    flag = xp.zeros(1, dtype=numpy.int32)
    _launch("flag_nonfinite_many", dtype, *elementwise_grid(total), (ptrs, starts, len(starts) - 1, flag))
    return flag
