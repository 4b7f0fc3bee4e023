"""The CUDA kernels of minires/kernels/cuda.py against the NumPy code they replace.

Two ways to run the same kernel source:

* on the CPU (always, needs g++): the wrappers run with NumPy arrays and
  ``cuda._launch`` swapped for the emulator (tests/cuda_emulator.py), so the
  wrapper code and the real kernel code are both exercised;
* on a GPU (``-m gpu``, skipped without CuPy and a GPU): the real
  ``cupy.RawModule`` launches.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import cuda_emulator
from minires import backend, optim
from minires.functional import activation, batchnorm, conv, loss
from minires.kernels import conv as engine_conv
from minires.kernels import cuda
from minires.nn.module import Module

pytestmark = pytest.mark.engine  # the engine's CUDA kernels, each against the textbook code it replaces

# (N, C, H, W, kh, kw, stride, padding): pad 0/1/2, stride 1/2/3, non-square
# kernels and inputs, batch 1, 1x1 kernels, a kernel as large as the input,
# a stride larger than the kernel (pixels that no window reads).
CONV_CASES = [
    (2, 3, 5, 5, 3, 3, 1, 1),
    (2, 3, 7, 6, 3, 3, 2, 1),
    (1, 2, 7, 7, 3, 3, 2, 0),
    (2, 3, 6, 6, 5, 5, 1, 2),
    (1, 2, 5, 7, 3, 2, (1, 2), (0, 2)),
    (3, 2, 6, 5, 1, 3, (2, 1), (2, 0)),
    (2, 4, 5, 5, 1, 1, 1, 0),
    (1, 3, 9, 8, 1, 1, 2, 0),
    (2, 2, 4, 4, 4, 4, 1, 0),
    (1, 1, 3, 5, 3, 3, 2, 2),
    (1, 2, 7, 7, 2, 2, 3, 0),
]
DTYPES = [numpy.float32, numpy.float64]
BN_SHAPES = [(4, 3, 5, 6), (1, 2, 3, 3), (2, 5, 1, 1), (3, 4, 7, 5)]


def _tol(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-5}


# --------------------------------------------------------------------------
# emulator plumbing
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    """{dtype name: emulator Kernels} built from cuda.kernel_source (the CuPy source)."""
    if not cuda_emulator.compiler_available():
        pytest.skip("g++ is not available to emulate the CUDA kernels")
    return {name: cuda_emulator.compile_kernels(cuda.kernel_source(name), T)
            for name, T in (("float32", "float"), ("float64", "double"))}


@pytest.fixture
def emulated(compiled, monkeypatch):
    """Route the wrappers' launches to the emulator; returns the launch log.

    Each launch runs as ``shape`` = (blocks, threads), one thread by default;
    a test may set ``emulated.shape`` to try other launch shapes. The log
    records (kernel, grid, block) as the wrapper asked for them.
    """
    class Emulated(list):
        shape = (1, 1)

    log = Emulated()

    def launch(name, dtype, grid, block, args):
        log.append((name, grid, block))
        if grid:
            blocks, threads = log.shape
            compiled[numpy.dtype(dtype).name].launch(name, cuda.kernel_args(args), blocks, threads)

    monkeypatch.setattr(cuda, "_launch", launch)
    return log


def _bn_inputs(rng, shape, dtype):
    C = shape[1]
    x = (rng.normal(size=shape) * 2 + 0.5).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, size=C).astype(dtype)
    beta = rng.normal(size=C).astype(dtype)
    return x, gamma, beta


def _reference_bn(forward, x, gamma, beta, training, rng):
    running_mean = rng.normal(size=gamma.shape).astype(x.dtype)
    running_var = rng.uniform(0.5, 2, size=gamma.shape).astype(x.dtype)
    out, cache = forward(x, gamma, beta, running_mean.copy(), running_var.copy(), training=training)
    return out, cache, running_mean, running_var


def _kernel_bn_forward(x, gamma, beta, running_mean, running_var, training, eps=1e-5):
    """The forward as batchnorm.py's CuPy branch composes the wrappers (running stats
    updated in place in training)."""
    if training:
        mean, inv_std = cuda.batchnorm_train_stats(x, running_mean, running_var, eps, 0.1)
    else:
        mean, inv_std = running_mean, cuda.batchnorm_eval_inv_std(running_var, eps)
    x_hat, out = cuda.batchnorm_normalize(x, mean, inv_std, gamma, beta)
    return out, x_hat, inv_std


# --------------------------------------------------------------------------
# the source itself
# --------------------------------------------------------------------------
def test_module_imports_without_cupy():
    """With ``import cupy`` made to fail, the module still imports and gives its source."""
    code = ("import sys; sys.modules['cupy'] = None\n"  # None in sys.modules: ImportError
            "from minires.kernels import cuda; assert 'T;' in cuda.kernel_source('float32')")
    env = {k: v for k, v in os.environ.items() if k != "MINIRES_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(cuda.__file__).parents[2])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_source_compiles_for_the_gpu(dtype):
    try:
        log = cuda_emulator.nvcc_check(cuda.kernel_source(dtype))
    except FileNotFoundError:
        pytest.skip("nvcc is not available")
    assert log == ""


def test_kernel_source_rejects_other_dtypes():
    with pytest.raises(ValueError, match="float16"):
        cuda.kernel_source(numpy.float16)


def test_launch_configuration():
    assert cuda.elementwise_grid(0) == (0, cuda.THREADS)
    assert cuda.elementwise_grid(1) == (1, cuda.THREADS)
    assert cuda.elementwise_grid(cuda.THREADS + 1) == (2, cuda.THREADS)
    assert cuda.elementwise_grid(10**10)[0] == cuda.MAX_BLOCKS  # the grid-stride loop does the rest
    assert cuda.channel_grid(16) == (16, cuda.REDUCE_THREADS)
    assert cuda.channel_grid(10**6)[0] == cuda.MAX_BLOCKS


def test_wrappers_refuse_numpy_arrays_without_the_emulator():
    x = numpy.zeros((1, 1, 3, 3), numpy.float32)
    with pytest.raises(TypeError, match="CuPy arrays"):
        cuda.im2col(x, 3, 3, (1, 1), (1, 1))


# --------------------------------------------------------------------------
# im2col / col2im, emulated
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col(emulated, case, dtype, rng):
    N, C, H, W, kh, kw, stride, padding = case
    x = rng.normal(size=(N, C, H, W)).astype(dtype)
    cols = cuda.im2col(x, kh, kw, stride, padding)
    expected = conv.im2col(x, kh, kw, stride, padding)
    assert cols.dtype == x.dtype and cols.flags.c_contiguous
    numpy.testing.assert_array_equal(cols, expected)  # a copy: bit for bit
    assert emulated == [("im2col", *cuda.elementwise_grid(cols.size))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im(emulated, case, dtype, rng):
    N, C, H, W, kh, kw, stride, padding = case
    *_, Ho, Wo = cuda.conv_geometry((N, C, H, W), kh, kw, stride, padding)
    cols = rng.normal(size=(C * kh * kw, N * Ho * Wo)).astype(dtype)
    dx = cuda.col2im(cols, (N, C, H, W), kh, kw, stride, padding)
    expected = conv.col2im(cols, (N, C, H, W), kh, kw, stride, padding)
    assert dx.shape == (N, C, H, W) and dx.dtype == cols.dtype and dx.flags.c_contiguous
    numpy.testing.assert_allclose(dx, expected, **_tol(dtype))


def test_col2im_is_the_adjoint_of_im2col(emulated, rng):
    """<im2col(x), cols> = <x, col2im(cols)>: the defining property of the backward."""
    x = rng.normal(size=(2, 3, 6, 5))
    for kh, kw, stride, padding in [(3, 3, 2, 1), (2, 3, (1, 2), (2, 0))]:
        cols = rng.normal(size=cuda.im2col(x, kh, kw, stride, padding).shape)
        lhs = numpy.vdot(cuda.im2col(x, kh, kw, stride, padding), cols)
        rhs = numpy.vdot(x, cuda.col2im(cols, x.shape, kh, kw, stride, padding))
        assert lhs == pytest.approx(rhs, rel=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (2, 7), (64, 3)])
def test_conv_kernels_any_launch_shape(emulated, shape, rng):
    """Grid-stride loops: every (blocks, threads) gives the same, complete output."""
    emulated.shape = shape
    x = rng.normal(size=(2, 3, 7, 6))
    numpy.testing.assert_array_equal(cuda.im2col(x, 3, 2, (2, 1), (1, 2)), conv.im2col(x, 3, 2, (2, 1), (1, 2)))
    cols = rng.normal(size=conv.im2col(x, 3, 3, 1, 1).shape)
    numpy.testing.assert_allclose(cuda.col2im(cols, x.shape, 3, 3, 1, 1),
                                  conv.col2im(cols, x.shape, 3, 3, 1, 1), rtol=1e-12, atol=1e-12)


def test_im2col_accepts_non_contiguous_input(emulated, rng):
    x = rng.normal(size=(3, 2, 5, 6)).transpose(1, 0, 2, 3)  # (2, 3, 5, 6), a strided view
    numpy.testing.assert_array_equal(cuda.im2col(x, 3, 3, 1, 1), conv.im2col(x, 3, 3, 1, 1))


def test_conv_wrappers_reject_bad_input(emulated):
    x = numpy.zeros((2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        cuda.im2col(x[0], 3, 3, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        cuda.im2col(x, 8, 3, 1, 1)
    with pytest.raises(ValueError, match=r"expected cols of shape \(27, 50\)"):
        cuda.col2im(numpy.zeros((27, 49)), x.shape, 3, 3, 1, 1)
    with pytest.raises(ValueError, match="float32 or float64"):
        cuda.im2col(x.astype(numpy.int64), 3, 3, 1, 1)
    assert emulated == []  # nothing launched


# --------------------------------------------------------------------------
# BatchNorm, emulated
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_train_stats(emulated, shape, dtype, rng):
    """mean, inv_std (biased variance), the running-stat update of batchnorm.py's NumPy
    code and num_batches_tracked += 1, in one launch."""
    x = _bn_inputs(rng, shape, dtype)[0]
    x[:, 0] = 3  # a constant channel: inv_std = 1 / sqrt(eps)
    C = shape[1]
    running_mean, running_var = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, size=C).astype(dtype)
    expected_mean, expected_var = running_mean.copy(), running_var.copy()
    x64 = x.astype(numpy.float64)
    m = x.size // C
    batchnorm.update_running_stats(expected_mean, expected_var, x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3)),
                              0.1, m)
    batches = numpy.array(7, dtype=numpy.int64)  # the module's num_batches_tracked
    mean, inv_std = cuda.batchnorm_train_stats(x, running_mean, running_var, 1e-5, 0.1, batches)
    assert int(batches) == 8
    assert mean.shape == inv_std.shape == (C,) and mean.dtype == inv_std.dtype == x.dtype
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-6}
    numpy.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), **tol)
    numpy.testing.assert_allclose(inv_std, 1 / numpy.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5), **tol)
    numpy.testing.assert_allclose(running_mean, expected_mean, **tol)
    numpy.testing.assert_allclose(running_var, expected_var, **tol)  # unbiased variance
    assert emulated == [("bn_stats", *cuda.channel_grid(C))]
    cuda.batchnorm_train_stats(x, running_mean, running_var, 1e-5, 0.1)  # no counter given
    assert int(batches) == 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_eval_inv_std(emulated, dtype, rng):
    running_var = rng.uniform(0, 3, size=5).astype(dtype)
    running_var[0] = 0
    inv_std = cuda.batchnorm_eval_inv_std(running_var, 1e-5)
    assert inv_std.dtype == dtype and inv_std.shape == (5,)
    numpy.testing.assert_allclose(inv_std, 1 / numpy.sqrt(running_var + dtype(1e-5)), rtol=1e-6)
    assert emulated == [("bn_eval_inv_std", *cuda.elementwise_grid(5))]


def test_batchnorm_variance_two_pass_is_robust(emulated, rng):
    """|mean| >> std in float32: E[x^2] - mean^2 would lose every digit of the variance."""
    x = (1000 + rng.normal(size=(8, 2, 6, 6))).astype(numpy.float32)
    _, inv_std = cuda.batchnorm_train_stats(x, numpy.zeros(2, numpy.float32), numpy.ones(2, numpy.float32),
                                            1e-5, 0.1)
    numpy.testing.assert_allclose(inv_std, 1 / numpy.sqrt(x.astype(numpy.float64).var(axis=(0, 2, 3)) + 1e-5),
                                  rtol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_forward(emulated, shape, dtype, training, rng):
    x, gamma, beta = _bn_inputs(rng, shape, dtype)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == numpy.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for forward in (batchnorm.batchnorm2d_forward, batchnorm.batchnorm2d_forward_naive):
        running_mean = rng.normal(size=gamma.shape).astype(dtype)
        running_var = rng.uniform(0.5, 2, size=gamma.shape).astype(dtype)
        rm, rv = running_mean.copy(), running_var.copy()
        out_ref, (x_hat_ref, _, inv_std_ref, _) = forward(x, gamma, beta, rm, rv, training=training)
        out, x_hat, inv_std = _kernel_bn_forward(x, gamma, beta, running_mean, running_var, training)
        numpy.testing.assert_allclose(running_mean, rm, **tol)  # updated alike (eval: not at all)
        numpy.testing.assert_allclose(running_var, rv, **tol)
        assert out.dtype == x_hat.dtype == x.dtype and out.shape == x_hat.shape == x.shape
        assert out.flags.c_contiguous and x_hat.flags.c_contiguous
        numpy.testing.assert_allclose(inv_std, inv_std_ref, **tol)
        numpy.testing.assert_allclose(x_hat, x_hat_ref, **tol)
        numpy.testing.assert_allclose(out, out_ref, **tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_backward(emulated, shape, dtype, training, rng):
    x, gamma, beta = _bn_inputs(rng, shape, dtype)
    _, cache, *_ = _reference_bn(batchnorm.batchnorm2d_forward, x, gamma, beta, training, rng)
    x_hat, _, inv_std, _ = cache
    dout = rng.normal(size=shape).astype(dtype)  # random upstream gradient, never all ones
    dx, dgamma, dbeta = cuda.batchnorm_backward(dout, x_hat, gamma, inv_std, training)
    assert dx.shape == shape and dx.dtype == dtype and dx.flags.c_contiguous
    assert dgamma.shape == dbeta.shape == (shape[1],) and dgamma.dtype == dbeta.dtype == dtype
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == numpy.float64 else {"rtol": 1e-3, "atol": 1e-4}
    for backward in (batchnorm.batchnorm2d_backward, batchnorm.batchnorm2d_backward_naive):
        dx_ref, dgamma_ref, dbeta_ref = backward(dout, cache)
        numpy.testing.assert_allclose(dx, dx_ref, **tol)
        numpy.testing.assert_allclose(dgamma, dgamma_ref, **tol)
        numpy.testing.assert_allclose(dbeta, dbeta_ref, **tol)
    assert emulated == [("bn_backward_sums", *cuda.channel_grid(shape[1])),
                        ("bn_backward_dx", *cuda.elementwise_grid(dx.size))]


def test_batchnorm_backward_matches_numerical_gradient(emulated, rng):
    """dx of the kernels against centred differences of sum(dout * out), float64."""
    x, gamma, beta = _bn_inputs(rng, (2, 2, 3, 2), numpy.float64)
    dout = rng.normal(size=x.shape)
    zeros = numpy.zeros(2)

    def loss(x):
        return numpy.sum(dout * _kernel_bn_forward(x, gamma, beta, zeros, zeros, True)[0])

    _, x_hat, inv_std = _kernel_bn_forward(x, gamma, beta, zeros, zeros, True)
    dx = cuda.batchnorm_backward(dout, x_hat, gamma, inv_std, True)[0]
    numeric = numpy.zeros_like(x)
    h = 1e-6
    for k in numpy.ndindex(x.shape):
        step = numpy.zeros_like(x)
        step[k] = h
        numeric[k] = (loss(x + step) - loss(x - step)) / (2 * h)
    numpy.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)


# (blocks, threads): fewer blocks than channels, more, and non-power-of-two
# block sizes. Threads > 1 run as real OS threads meeting at __syncthreads.
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 4), (1, 5), (3, 8)])
def test_batchnorm_reductions_any_launch_shape(emulated, shape, rng):
    emulated.shape = shape
    x, gamma, beta = _bn_inputs(rng, (3, 3, 4, 5), numpy.float64)
    batches = numpy.array(0, dtype=numpy.int64)
    mean, inv_std = cuda.batchnorm_train_stats(x, numpy.zeros(3), numpy.ones(3), 1e-5, 0.1, batches)
    numpy.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    numpy.testing.assert_allclose(inv_std, 1 / numpy.sqrt(x.var(axis=(0, 2, 3)) + 1e-5), rtol=1e-12)
    assert int(batches) == 1  # counted once, whatever the number of blocks
    _, cache = batchnorm.batchnorm2d_forward(x, gamma, beta, numpy.zeros(3), numpy.ones(3))
    dout = rng.normal(size=x.shape)
    for got, expected in zip(cuda.batchnorm_backward(dout, cache[0], gamma, cache[2], True),
                             batchnorm.batchnorm2d_backward(dout, cache)):
        numpy.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_batchnorm_wrappers_reject_bad_input(emulated):
    x = numpy.zeros((2, 3, 4, 4))
    c = numpy.ones(3)
    with pytest.raises(ValueError, match=r"gamma of shape \(3,\)"):
        cuda.batchnorm_normalize(x, c, c, numpy.ones(4), c)
    with pytest.raises(ValueError, match="one dtype"):
        cuda.batchnorm_normalize(x, c, c, c.astype(numpy.float32), c)
    with pytest.raises(ValueError, match="x_hat of shape"):
        cuda.batchnorm_backward(x, x[:1], c, c, True)
    with pytest.raises(ValueError, match="more than one value per channel"):
        cuda.batchnorm_train_stats(x[:0], c.copy(), c.copy(), 1e-5, 0.1)
    with pytest.raises(ValueError, match=r"running_var of shape \(3,\)"):
        cuda.batchnorm_train_stats(x, c.copy(), numpy.ones(4), 1e-5, 0.1)
    with pytest.raises(ValueError, match="updated in place must be C-contiguous"):
        cuda.batchnorm_train_stats(x, c.copy(), numpy.ones(6)[::2], 1e-5, 0.1)
    for bad in (numpy.zeros(1, numpy.int64), numpy.int64(0), 0):  # a scalar would be passed by value
        with pytest.raises(ValueError, match="num_batches_tracked as a 0-d int64 array"):
            cuda.batchnorm_train_stats(x, c.copy(), c.copy(), 1e-5, 0.1, bad)
    assert emulated == []


# --------------------------------------------------------------------------
# ReLU backward, emulated
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward(emulated, dtype, rng):
    out = numpy.maximum(rng.normal(size=(3, 4, 5, 5)), 0).astype(dtype)  # about half exact zeros
    dout = rng.normal(size=out.shape).astype(dtype)
    dout[0, 0, 0, :2] = numpy.nan  # NaNs stay visible, as in the NumPy version
    dx = cuda.relu_backward(dout, out)
    assert dx.dtype == dtype and dx.flags.c_contiguous
    numpy.testing.assert_array_equal(dx, activation.relu_backward(dout, out))


def test_relu_backward_rejects_mismatched_shapes(emulated):
    with pytest.raises(ValueError, match="expected dout of shape"):
        cuda.relu_backward(numpy.zeros((2, 3)), numpy.zeros((3, 2)))


# --------------------------------------------------------------------------
# SGD with momentum, emulated
# --------------------------------------------------------------------------
class _OneParam(Module):
    def __init__(self, weight):
        super().__init__()
        self.add_param("weight", weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("settings", [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.8, "weight_decay": 0.0, "nesterov": True},
    {"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
], ids=["wd", "nesterov", "nesterov-wd"])
def test_sgd_momentum_step(emulated, settings, dtype, rng):
    """Three steps of the kernel against optim.SGD's NumPy update of the same parameter."""
    weight = rng.normal(size=(5, 7)).astype(dtype)
    model = _OneParam(weight.copy())
    opt = optim.SGD(model, lr=0.1, **settings)
    p, buf = weight.copy(), numpy.full_like(weight, numpy.nan)  # buf is not read at step 1
    for step in range(3):
        grad = rng.normal(size=weight.shape).astype(dtype)
        model.grads["weight"][...] = grad
        opt.step()
        cuda.sgd_momentum_step(p, grad, buf, 0.1, settings["momentum"], settings["weight_decay"],
                               settings.get("nesterov", False), first=step == 0)
        tol = {"rtol": 1e-14, "atol": 1e-15} if dtype == numpy.float64 else {"rtol": 1e-6, "atol": 1e-7}
        numpy.testing.assert_allclose(p, model.params["weight"], **tol)
        numpy.testing.assert_allclose(buf, opt.state["momentum_buffer"]["weight"], **tol)
    assert [name for name, *_ in emulated] == ["sgd_momentum_step"] * 3


def test_sgd_momentum_step_rejects_bad_input(emulated):
    p = numpy.zeros((4, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        cuda.sgd_momentum_step(p, numpy.zeros((3, 4)), numpy.zeros((4, 3)), 0.1, 0.9, 0, False, True)
    with pytest.raises(ValueError, match="updated in place must be C-contiguous"):
        cuda.sgd_momentum_step(p.T, p.T, p.T.copy(), 0.1, 0.9, 0, False, True)
    assert emulated == []


def test_col2im_into_out(emulated, rng):
    """col2im writes straight into a given array (conv2d_backward's dx on a GPU: no copy)."""
    x_shape, args = (2, 3, 5, 6), (3, 3, 2, 1)
    cols = rng.normal(size=conv.im2col(numpy.zeros(x_shape), *args).shape)
    expected = conv.col2im(cols, x_shape, *args)
    for col2im in (engine_conv.col2im, cuda.col2im):
        out = numpy.full(x_shape, numpy.nan)
        assert col2im(cols, x_shape, *args, out=out) is out
        numpy.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="expected out of shape"):
            col2im(cols, x_shape, *args, out=numpy.zeros((2, 3, 5, 5)))
    with pytest.raises(ValueError, match="must be C-contiguous"):
        cuda.col2im(cols, x_shape, *args, out=numpy.zeros(x_shape[::-1]).T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, scale", [(5, 10, 1.0), (1, 3, 1.0), (4, 1, 1.0), (6, 7, 1e4)],
                         ids=["5x10", "1x3", "one-class", "huge-logits"])
def test_softmax_cross_entropy(emulated, N, K, scale, dtype, rng):
    """The two kernels against loss.py's NumPy forward (loss, probabilities) and backward."""
    emulated.shape = (3, 4)
    logits = (rng.normal(size=(N, K)) * scale).astype(dtype)
    labels = rng.integers(0, K, N)
    loss_ref, (probs_ref, _) = loss.softmax_cross_entropy_forward(logits, labels)
    got, (probs, got_labels) = cuda.softmax_cross_entropy_forward(logits, labels)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert got.dtype == dtype and got.shape == () and got_labels.dtype == numpy.int64
    numpy.testing.assert_allclose(got, loss_ref, **tol)
    numpy.testing.assert_allclose(probs, probs_ref, **tol)
    dlogits = cuda.softmax_cross_entropy_backward(0.5, probs, labels)
    numpy.testing.assert_allclose(dlogits, loss.softmax_cross_entropy_backward(0.5, (probs_ref, labels)), **tol)
    assert [name for name, *_ in emulated] == ["softmax_xent_forward", "softmax_xent_backward"]


def test_softmax_cross_entropy_kernels_reject_bad_labels(emulated):
    logits = numpy.zeros((3, 4))
    with pytest.raises(ValueError, match=r"int64 labels of shape \(3,\)"):
        cuda.softmax_cross_entropy_forward(logits, numpy.zeros(3, numpy.int32))
    with pytest.raises(ValueError, match=r"int64 labels of shape \(3,\)"):
        cuda.softmax_cross_entropy_backward(1.0, logits, numpy.zeros(2, numpy.int64))
    with pytest.raises(ValueError, match="logits"):
        cuda.softmax_cross_entropy_forward(numpy.zeros((0, 4)), numpy.zeros(0, numpy.int64))
    assert emulated == []


# --------------------------------------------------------------------------
# many arrays in one launch, emulated
# --------------------------------------------------------------------------
class _ManyParams(Module):
    """Parameters of several shapes, one of them empty (its table entry covers no elements)."""

    def __init__(self, rng, dtype, shapes=((4, 3, 3, 3), (4,), (0,), (10, 4), (1,))):
        super().__init__()
        for k, shape in enumerate(shapes):
            self.add_param(f"p{k}", rng.normal(size=shape).astype(dtype))


@pytest.mark.parametrize("shape", [(1, 1), (3, 4)], ids=["1x1", "3x4"])
def test_zero_many(emulated, shape, rng):
    emulated.shape = shape
    arrays = list(_ManyParams(rng, numpy.float32).params.values())
    cuda.zero_many(arrays)
    assert all((a == 0).all() for a in arrays)
    assert [name for name, *_ in emulated] == ["zero_many"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_sgd_momentum_step_many(emulated, dtype, nesterov, rng):
    """Three steps of the one-launch update against optim.SGD's NumPy update, parameter by parameter."""
    emulated.shape = (3, 4)
    model = _ManyParams(rng, dtype)
    params = {name: p.copy() for name, p in model.params.items()}
    bufs = {name: numpy.full_like(p, numpy.nan) for name, p in params.items()}  # unread at step 1
    opt = optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for step in range(3):
        grads = {name: rng.normal(size=p.shape).astype(dtype) for name, p in params.items()}
        for name, g in grads.items():
            model.grads[name][...] = g
        opt.step()
        cuda.sgd_momentum_step_many(params.values(), grads.values(), bufs.values(), 0.1, 0.9, 5e-4,
                                    nesterov, first=step == 0)
        tol = {"rtol": 1e-14, "atol": 1e-15} if dtype == numpy.float64 else {"rtol": 1e-6, "atol": 1e-7}
        for name in params:
            numpy.testing.assert_allclose(params[name], model.params[name], **tol)
            numpy.testing.assert_allclose(bufs[name], opt.state["momentum_buffer"][name], **tol)
    assert [name for name, *_ in emulated] == ["sgd_momentum_step_many"] * 3


@pytest.mark.parametrize("bad", [None, numpy.nan, numpy.inf, -numpy.inf], ids=["finite", "nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 3, 4], ids=["first", "middle", "last"])
def test_flag_nonfinite_many(emulated, bad, where, rng):
    emulated.shape = (3, 4)
    arrays = list(_ManyParams(rng, numpy.float64).params.values())
    arrays[2] = numpy.zeros(0)  # (empty)
    if bad is not None:
        arrays[where].flat[-1] = bad
    flag = cuda.flag_nonfinite_many(arrays)
    assert flag.dtype == numpy.int32 and flag.tolist() == [0 if bad is None else 1]
    assert [name for name, *_ in emulated] == ["flag_nonfinite_many"]


@pytest.mark.parametrize("shape", [(1, 1), (3, 4)], ids=["1x1", "3x4"])
def test_many_array_kernels_write_only_their_arrays(emulated, shape):
    """The kernels write through addresses, past the emulator's guard bytes: here the
    arrays are slices of one buffer, with sentinels between them that must survive."""
    emulated.shape = shape
    sizes = [3, 0, 7, 1, 0, 4]

    def framed(fill):  # (buffer, arrays): each array framed by two -123s
        buf, arrays, pos = numpy.full(sum(sizes) + 2 * len(sizes) + 1, -123.0), [], 1
        for size in sizes:
            arrays.append(buf[pos:pos + size])
            arrays[-1][...] = fill
            pos += size + 2
        return buf, arrays

    (pb, params), (gb, grads), (bb, bufs) = framed(1.0), framed(2.0), framed(numpy.nan)
    cuda.sgd_momentum_step_many(params, grads, bufs, 0.1, 0.9, 0.0, False, True)
    cuda.zero_many(grads)
    for buf, arrays in ((pb, params), (gb, grads), (bb, bufs)):
        assert (buf == -123.0).sum() == buf.size - sum(sizes)
    assert all((p == 1 - 0.1 * 2).all() for p in params) and all((g == 0).all() for g in grads)


def test_many_array_kernels_reject_bad_input(emulated):
    a, b = numpy.zeros((2, 3)), numpy.zeros(4)
    with pytest.raises(ValueError, match="at least one array"):
        cuda.zero_many([])
    with pytest.raises(ValueError, match="one dtype"):
        cuda.zero_many([a, b.astype(numpy.float32)])
    with pytest.raises(ValueError, match="must be C-contiguous"):
        cuda.flag_nonfinite_many([a.T])
    with pytest.raises(ValueError, match="2 parameters, 1 gradients"):
        cuda.sgd_momentum_step_many([a, b], [a], [a, b], 0.1, 0.9, 0, False, True)
    with pytest.raises(ValueError, match="shapes differ"):
        cuda.sgd_momentum_step_many([a], [b], [a], 0.1, 0.9, 0, False, True)
    with pytest.raises(ValueError, match="one dtype"):  # a float32 gradient read as double: garbage
        cuda.sgd_momentum_step_many([a], [a.astype(numpy.float32)], [a], 0.1, 0.9, 0, False, True)
    with pytest.raises(ValueError, match="the same array appears twice"):  # two threads, one element
        cuda.sgd_momentum_step_many([a, a], [a, a], [a.copy(), a.copy()], 0.1, 0.9, 0, False, True)
    assert emulated == []


# --------------------------------------------------------------------------
# the real kernels on a GPU
# --------------------------------------------------------------------------
@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    if not backend.cupy_available():
        pytest.skip("CuPy found no GPU")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES + [(8, 16, 32, 32, 3, 3, 1, 1)])  # last: > MAX_BLOCKS * THREADS
def test_gpu_im2col_col2im(cp, case, dtype, rng):
    N, C, H, W, kh, kw, stride, padding = case
    x = rng.normal(size=(N, C, H, W)).astype(dtype)
    cols = cuda.im2col(cp.asarray(x), kh, kw, stride, padding)
    assert isinstance(cols, cp.ndarray) and cols.flags.c_contiguous
    numpy.testing.assert_array_equal(cp.asnumpy(cols), conv.im2col(x, kh, kw, stride, padding))
    dcols = rng.normal(size=cols.shape).astype(dtype)
    dx = cuda.col2im(cp.asarray(dcols), x.shape, kh, kw, stride, padding)
    numpy.testing.assert_allclose(cp.asnumpy(dx), conv.col2im(dcols, x.shape, kh, kw, stride, padding),
                                  **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES + [(64, 16, 32, 32)])
def test_gpu_batchnorm(cp, shape, dtype, training, rng):
    x, gamma, beta = _bn_inputs(rng, shape, dtype)
    out_ref, cache, rm, rv = _reference_bn(batchnorm.batchnorm2d_forward, x, gamma, beta, training, rng)
    x_hat_ref, _, inv_std_ref, _ = cache
    g, b = cp.asarray(gamma), cp.asarray(beta)
    running_mean, running_var = cp.asarray(rm), cp.asarray(rv)  # rm, rv: before the reference's update
    if training:
        mean, inv_std = cuda.batchnorm_train_stats(cp.asarray(x), running_mean, running_var, 1e-5, 0.1)
    else:
        mean, inv_std = running_mean, cuda.batchnorm_eval_inv_std(running_var, 1e-5)
    x_hat, out = cuda.batchnorm_normalize(cp.asarray(x), mean, inv_std, g, b)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == numpy.float64 else {"rtol": 1e-4, "atol": 1e-4}
    if training:
        batchnorm.update_running_stats(rm, rv, x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), 0.1,
                                  x.size // x.shape[1])
    numpy.testing.assert_allclose(cp.asnumpy(running_mean), rm, **tol)
    numpy.testing.assert_allclose(cp.asnumpy(running_var), rv, **tol)
    numpy.testing.assert_allclose(cp.asnumpy(inv_std), inv_std_ref, **tol)
    numpy.testing.assert_allclose(cp.asnumpy(x_hat), x_hat_ref, **tol)
    numpy.testing.assert_allclose(cp.asnumpy(out), out_ref, **tol)

    dout = rng.normal(size=shape).astype(dtype)
    grads = cuda.batchnorm_backward(cp.asarray(dout), cp.asarray(x_hat_ref), g, cp.asarray(inv_std_ref), training)
    for got, expected in zip(grads, batchnorm.batchnorm2d_backward(dout, cache)):
        numpy.testing.assert_allclose(cp.asnumpy(got), expected, **(tol if dtype == numpy.float64 else
                                                                    {"rtol": 1e-3, "atol": 1e-3}))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sgd_momentum_step(cp, dtype, rng):
    """The real kernel against optim.SGD's NumPy update (the GPU may fuse a*b + c: float32 tolerance)."""
    weight = rng.normal(size=(64, 16, 3, 3)).astype(dtype)
    model = _OneParam(weight.copy())
    opt = optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    p, buf = cp.asarray(weight), cp.full(weight.shape, cp.nan, dtype=dtype)  # buf unread at step 1
    for step in range(3):
        grad = rng.normal(size=weight.shape).astype(dtype)
        model.grads["weight"][...] = grad
        opt.step()
        cuda.sgd_momentum_step(p, cp.asarray(grad), buf, 0.1, 0.9, 5e-4, True, first=step == 0)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-6}
    numpy.testing.assert_allclose(cp.asnumpy(p), model.params["weight"], **tol)
    numpy.testing.assert_allclose(cp.asnumpy(buf), opt.state["momentum_buffer"]["weight"], **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [(1, 1), (3, 7), (5, 32)])
def test_gpu_kernels_any_launch_shape(cp, launch, rng):
    """The real kernels on odd launch shapes (non-power-of-two blocks, fewer blocks than channels)."""
    x = rng.normal(size=(3, 6, 5, 7))
    geometry = cuda.conv_geometry(x.shape, 3, 2, (2, 1), (1, 2))
    expected = conv.im2col(x, 3, 2, (2, 1), (1, 2))
    cols = cp.full(expected.shape, cp.nan)
    kernel = cuda._module("float64").get_function
    kernel("im2col")((launch[0],), (launch[1],), cuda.kernel_args((cp.asarray(x), cols) + geometry))
    numpy.testing.assert_array_equal(cp.asnumpy(cols), expected)
    mean, inv_std = cp.full(6, cp.nan), cp.full(6, cp.nan)
    running_mean, running_var, batches = cp.zeros(6), cp.ones(6), cp.zeros((), dtype=cp.int64)
    f = numpy.float64  # the kernel's T
    kernel("bn_stats")((launch[0],), (launch[1],), cuda.kernel_args(
        (cp.asarray(x), mean, inv_std, running_mean, running_var, batches, 3, 6, 35,
         f(1e-5), f(0.9), f(0.1), f(0.1 * 105 / 104), 1)))
    numpy.testing.assert_allclose(cp.asnumpy(mean), x.mean(axis=(0, 2, 3)), rtol=1e-12)
    numpy.testing.assert_allclose(cp.asnumpy(inv_std), 1 / numpy.sqrt(x.var(axis=(0, 2, 3)) + 1e-5), rtol=1e-12)
    assert int(batches) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_relu_backward(cp, dtype, rng):
    out = numpy.maximum(rng.normal(size=(4, 8, 6, 6)), 0).astype(dtype)
    dout = rng.normal(size=out.shape).astype(dtype)
    dx = cuda.relu_backward(cp.asarray(dout), cp.asarray(out))
    numpy.testing.assert_array_equal(cp.asnumpy(dx), activation.relu_backward(dout, out))


def test_conv_geometry_hands_the_kernels_plain_ints():
    """A NumPy integer would reach the kernel at its own size (8 bytes), not as a C int."""
    from minires.kernels import cuda
    args = cuda.conv_geometry((2, 3, 5, 5), numpy.int64(3), numpy.int32(3), numpy.int64(1), 1)
    assert all(type(a) is int for a in args)
    with pytest.raises(ValueError, match="kernel"):
        cuda.conv_geometry((2, 3, 5, 5), 2.5, 3, 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_many_array_kernels(cp, dtype, rng):
    """zero_many, sgd_momentum_step_many and flag_nonfinite_many on real device addresses."""
    model = _ManyParams(rng, dtype)
    opt = optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = [cp.asarray(p) for p in model.params.values()]
    bufs = [cp.full(p.shape, cp.nan, dtype=dtype) for p in params]
    for step in range(3):
        grads = [rng.normal(size=p.shape).astype(dtype) for p in params]
        for name, g in zip(model.grads, grads):
            model.grads[name][...] = g
        opt.step()
        device_grads = [cp.asarray(g) for g in grads]
        assert int(cuda.flag_nonfinite_many(device_grads)[0]) == 0
        cuda.sgd_momentum_step_many(params, device_grads, bufs, 0.1, 0.9, 5e-4, False, first=step == 0)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for p, name in zip(params, model.params):
        numpy.testing.assert_allclose(cp.asnumpy(p), model.params[name], **tol)
    device_grads[1][2] = cp.inf
    assert int(cuda.flag_nonfinite_many(device_grads)[0]) == 1
    cuda.zero_many(device_grads)
    assert all(not cp.asnumpy(g).any() for g in device_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_softmax_cross_entropy(cp, dtype, rng):
    logits = (rng.normal(size=(128, 10)) * 3).astype(dtype)
    labels = rng.integers(0, 10, 128)
    loss_ref, cache_ref = loss.softmax_cross_entropy_forward(logits, labels)
    got, (probs, _) = cuda.softmax_cross_entropy_forward(cp.asarray(logits), cp.asarray(labels))
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-6}
    numpy.testing.assert_allclose(float(got), loss_ref, **tol)
    numpy.testing.assert_allclose(cp.asnumpy(probs), cache_ref[0], **tol)
    dlogits = cuda.softmax_cross_entropy_backward(1.0, probs, cp.asarray(labels))
    numpy.testing.assert_allclose(cp.asnumpy(dlogits), loss.softmax_cross_entropy_backward(1.0, cache_ref), **tol)


def test_fits_one_launch_wants_device_arrays():
    assert not cuda.fits_one_launch([numpy.zeros(3)])  # host arrays: the CPU code path
    assert not cuda.fits_one_launch([])


@pytest.mark.gpu
def test_gpu_fits_one_launch(cp):
    a, b = cp.zeros((2, 3)), cp.zeros(4)
    assert cuda.fits_one_launch([a, b])
    assert not cuda.fits_one_launch([a, b.astype(cp.float32)])  # one dtype per launch
    assert not cuda.fits_one_launch([a.T, b])  # written through addresses: contiguous only
    assert not cuda.fits_one_launch([cp.zeros(3, dtype=cp.int32)])
