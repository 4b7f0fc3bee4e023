"""Property tests (issue 9, item 6): random shapes, strides, paddings and batch
sizes for convolution, max/average pooling and batch normalization.

For every drawn geometry:
* the output shape equals the formula  Ho = (H + 2 ph - kh) // sh + 1  (same for W);
* the fast op equals its naive loop twin (conv: see test_conv.py, which already
  draws random geometries for fast == naive; here conv gets shapes and gradients);
* the backward agrees with centered differences (float64, random upstream gradient);
* a geometry where no window fits raises a ValueError naming the module.

Sizes are tiny and examples few, so the whole file runs in a few seconds.
"""
import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minires import nn
from minires.functional.batchnorm import (batchnorm2d_backward, batchnorm2d_backward_naive,
                                          batchnorm2d_forward, batchnorm2d_forward_naive)
from minires.functional.conv import conv2d_forward, conv2d_forward_naive
from minires.functional.pooling import (avgpool2d_backward, avgpool2d_backward_naive, avgpool2d_forward,
                                        avgpool2d_forward_naive, maxpool2d_backward, maxpool2d_backward_naive,
                                        maxpool2d_forward, maxpool2d_forward_naive)
from minires.gradcheck import check_gradients, check_module, rel_error

FEW = settings(max_examples=20, deadline=None)
GRAD_TOL = 1e-7


def out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


@st.composite
def window_geometry(draw, max_kernel=4, max_stride=3, max_padding=2, pool=False):
    """(n, c, h, w, kernel, stride, padding) with at least one window fitting.

    Pooling padding is at most half the kernel (PyTorch's rule, also ours)."""
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    if pool:
        padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    else:
        padding = (draw(st.integers(0, max_padding)), draw(st.integers(0, max_padding)))
    h = draw(st.integers(max(1, kernel[0] - 2 * padding[0]), 7))
    w = draw(st.integers(max(1, kernel[1] - 2 * padding[1]), 7))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return n, c, h, w, kernel, stride, padding


def distinct_values(seed, shape):
    """No ties and gaps >> the finite-difference step: max pool's arg-max stays put."""
    gen = numpy.random.default_rng(seed)
    return gen.permutation(int(numpy.prod(shape))).reshape(shape) * 0.01 + gen.uniform(-0.002, 0.002, shape)


# --------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------
@FEW
@given(geometry=window_geometry(), f=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_shape_and_gradients(geometry, f, bias, seed):
    n, c, h, w, kernel, stride, padding = geometry
    gen = numpy.random.default_rng(seed)
    conv = nn.Conv2d(c, f, kernel, stride, padding, bias=bias).astype(numpy.float64)
    x = gen.standard_normal((n, c, h, w))
    expected = (n, f, out_size(h, kernel[0], stride[0], padding[0]), out_size(w, kernel[1], stride[1], padding[1]))
    b = conv.params.get("bias")
    assert conv(x).shape == expected
    conv.cache = None
    assert conv2d_forward(x, conv.params["weight"], b, stride, padding)[0].shape == expected
    assert conv2d_forward_naive(x, conv.params["weight"], b, stride, padding)[0].shape == expected
    errors = check_module(conv, x, num_checks=12, seed=seed)
    assert max(errors.values()) < GRAD_TOL, errors


@FEW
@given(kernel=st.integers(2, 5), padding=st.integers(0, 1), data=st.data())
def test_conv_too_small_input_is_refused(kernel, padding, data):
    too_small = kernel - 2 * padding - 1  # one pixel short of a window
    if too_small < 1:
        return  # padding alone makes any input fit
    h = data.draw(st.integers(1, too_small), label="h")
    conv = nn.Conv2d(1, 1, kernel, padding=padding)
    with pytest.raises(ValueError, match=rf"^Conv2d\(1, 1, .*at least {kernel - 2 * padding}x\d+ pixels"):
        conv(numpy.zeros((1, 1, h, 9), numpy.float32))


# --------------------------------------------------------------------------
# max and average pooling
# --------------------------------------------------------------------------
POOLS = {
    "max": (nn.MaxPool2d, maxpool2d_forward, maxpool2d_backward, maxpool2d_forward_naive, maxpool2d_backward_naive),
    "avg": (nn.AvgPool2d, avgpool2d_forward, avgpool2d_backward, avgpool2d_forward_naive, avgpool2d_backward_naive),
}


@pytest.mark.parametrize("kind", ["max", "avg"])
@FEW
@given(geometry=window_geometry(max_kernel=3, pool=True), default_stride=st.booleans(), seed=st.integers(0, 2**16))
def test_pool_fast_equals_naive_shape_and_gradients(kind, geometry, default_stride, seed):
    n, c, h, w, kernel, stride, padding = geometry
    module_cls, forward, backward, forward_naive, backward_naive = POOLS[kind]
    if default_stride:
        stride = None  # PyTorch's default: the kernel size
    x = distinct_values(seed, (n, c, h, w))
    out, cache = forward(x, kernel, stride, padding)
    s = kernel if stride is None else stride
    assert out.shape == (n, c, out_size(h, kernel[0], s[0], padding[0]), out_size(w, kernel[1], s[1], padding[1]))
    out_naive, cache_naive = forward_naive(x, kernel, stride, padding)
    assert rel_error(out, out_naive) < 1e-13
    dout = numpy.random.default_rng([seed, 1]).standard_normal(out.shape)
    dx = backward(dout, cache)
    assert dx.shape == x.shape
    assert rel_error(dx, backward_naive(dout, cache_naive)) < 1e-13
    errors = check_gradients(lambda: forward(x, kernel, stride, padding)[0], {"x": x}, {"x": dx}, dout,
                             num_checks=15, seed=seed)
    assert errors["x"] < GRAD_TOL, errors
    # the module wraps exactly this op
    module = module_cls(kernel, stride, padding)
    assert numpy.array_equal(module(x), out) and numpy.array_equal(module.backward(dout), dx)


@pytest.mark.parametrize("kind", ["max", "avg"])
@FEW
@given(kernel=st.integers(2, 4), data=st.data())
def test_pool_too_small_input_is_refused(kind, kernel, data):
    padding = data.draw(st.integers(0, (kernel - 2) // 2), label="padding")  # leaves room to be short
    h = data.draw(st.integers(1, kernel - 2 * padding - 1), label="h")
    module = POOLS[kind][0](kernel, padding=padding)
    with pytest.raises(ValueError, match=rf"^(Max|Avg)Pool2d\(kernel_size={kernel}.*expected an input of at least"):
        module(numpy.zeros((1, 1, h, 8), numpy.float32))


# --------------------------------------------------------------------------
# batch normalization
# --------------------------------------------------------------------------
@st.composite
def bn_case(draw):
    n, c, h, w = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    training = draw(st.booleans())
    if training and n * h * w < 3:
        n = 3  # with 1 value per channel there is no variance; with 2, x_hat is +-1 whatever x is
    momentum = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return (n, c, h, w), training, momentum, eps, draw(st.integers(0, 2**16))


@FEW
@given(case=bn_case())
def test_batchnorm_fast_equals_naive_shape_and_gradients(case):
    shape, training, momentum, eps, seed = case
    gen = numpy.random.default_rng(seed)
    c = shape[1]
    x = gen.standard_normal(shape) * gen.uniform(0.5, 3) + gen.uniform(-2, 2)
    gamma, beta = gen.uniform(0.5, 1.5, c), gen.standard_normal(c)
    running = (gen.standard_normal(c), gen.uniform(0.5, 2, c))
    fast_stats = tuple(r.copy() for r in running)
    naive_stats = tuple(r.copy() for r in running)
    out, cache = batchnorm2d_forward(x, gamma, beta, *fast_stats, momentum, eps, training)
    out_naive, cache_naive = batchnorm2d_forward_naive(x, gamma, beta, *naive_stats, momentum, eps, training)
    assert out.shape == x.shape
    assert rel_error(out, out_naive) < 1e-12
    for fast, naive in zip(fast_stats, naive_stats):  # the running stats moved the same way
        assert rel_error(fast, naive) < 1e-12
    dout = numpy.random.default_rng([seed, 1]).standard_normal(shape)
    grads = batchnorm2d_backward(dout, cache)
    for g, g_naive in zip(grads, batchnorm2d_backward_naive(dout, cache_naive)):
        assert rel_error(g, g_naive) < 1e-10
    dx, dgamma, dbeta = grads
    assert dx.shape == x.shape and dgamma.shape == dbeta.shape == (c,)

    def forward():  # fresh running-stat copies: the check must not drift them
        return batchnorm2d_forward(x, gamma, beta, *(r.copy() for r in running), momentum, eps, training)[0]
    errors = check_gradients(forward, {"x": x, "gamma": gamma, "beta": beta},
                             {"x": dx, "gamma": dgamma, "beta": dbeta}, dout, num_checks=12, seed=seed)
    assert max(errors.values()) < 1e-6, errors
