"""Max / average / global average pooling: fast == naive, gradient checks,
PyTorch parity (including max-pool ties), errors, dtypes."""
import numpy
import pytest

from minires import backend
from minires.functional.pooling import (
    avgpool2d_backward,
    avgpool2d_backward_naive,
    avgpool2d_forward,
    avgpool2d_forward_naive,
    global_avgpool_backward,
    global_avgpool_forward,
    maxpool2d_backward,
    maxpool2d_backward_naive,
    maxpool2d_forward,
    maxpool2d_forward_naive,
)
from minires.gradcheck import check_gradients, rel_error

POOLS = {
    "max": (maxpool2d_forward, maxpool2d_backward, maxpool2d_forward_naive, maxpool2d_backward_naive),
    "avg": (avgpool2d_forward, avgpool2d_backward, avgpool2d_forward_naive, avgpool2d_backward_naive),
}

# (x shape, kernel_size, stride, padding)
CASES = [
    ((2, 3, 8, 8), 2, None, 0),         # the classic 2x2 / 2
    ((2, 3, 7, 7), 3, 2, 1),            # ImageNet-ResNet stem pool: overlapping windows
    ((2, 2, 7, 9), 3, 1, 1),            # stride 1: heavy overlap
    ((1, 2, 5, 6), 2, 1, 0),            # batch 1, non-square
    ((2, 2, 9, 7), (2, 3), (2, 1), (1, 1)),  # non-square kernel, asymmetric stride
    ((2, 2, 6, 8), (3, 2), None, (1, 0)),    # stride defaults to the kernel
    ((2, 1, 5, 5), 2, 3, 0),            # stride > kernel: pixels no window sees
    ((2, 2, 4, 5), (4, 5), None, 0),    # one window covers the input
]


def _ids(case):
    shape, k, s, p = case
    return f"{shape[2]}x{shape[3]}_k{k}_s{s}_p{p}".replace(" ", "")


def _distinct(rng, shape):
    """Values with no ties and gaps >> the finite-difference step, so the
    arg-max of every window is stable under perturbation."""
    return (rng.permutation(int(numpy.prod(shape))).reshape(shape) * 0.01
            + rng.uniform(-0.002, 0.002, shape))


def _assert_close(actual, expected, tol=1e-12):
    assert actual.shape == expected.shape
    assert rel_error(actual, expected) < tol


# --------------------------------------------------------------------------
# fast == naive
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fast_matches_naive(kind, case, rng):
    forward, backward, forward_naive, backward_naive = POOLS[kind]
    shape, kernel, stride, padding = case
    x = rng.standard_normal(shape)
    out, cache = forward(x, kernel, stride, padding)
    out_n, cache_n = forward_naive(x, kernel, stride, padding)
    _assert_close(out, out_n)
    dout = rng.standard_normal(out.shape)
    _assert_close(backward(dout, cache), backward_naive(dout, cache_n))


@pytest.mark.maxpool2d_backward
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_maxpool_ties_go_to_the_first_argmax(case, rng):
    """Small integers make ties common; fast and naive both pick the first."""
    shape, kernel, stride, padding = case
    x = rng.integers(0, 3, shape).astype(numpy.float64)
    out, cache = maxpool2d_forward(x, kernel, stride, padding)
    out_n, cache_n = maxpool2d_forward_naive(x, kernel, stride, padding)
    numpy.testing.assert_array_equal(out, out_n)
    dout = rng.standard_normal(out.shape)
    _assert_close(maxpool2d_backward(dout, cache), maxpool2d_backward_naive(dout, cache_n))


@pytest.mark.maxpool2d_backward
def test_maxpool_gradient_is_a_switch():
    x = numpy.array([[[[1.0, 5.0], [3.0, 2.0]]]])
    out, cache = maxpool2d_forward(x, 2)
    assert out.item() == 5.0
    dx = maxpool2d_backward(numpy.array([[[[7.0]]]]), cache)
    numpy.testing.assert_array_equal(dx, [[[[0.0, 7.0], [0.0, 0.0]]]])


def test_maxpool_padding_never_wins():
    x = -numpy.ones((1, 1, 2, 2))  # all negative: a zero padding would win
    out, _ = maxpool2d_forward(x, 2, stride=1, padding=1)
    numpy.testing.assert_array_equal(out, -numpy.ones((1, 1, 3, 3)))


def test_maxpool_propagates_nan():
    x = numpy.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 1, 0] = numpy.nan
    out, _ = maxpool2d_forward(x, 2)
    assert numpy.isnan(out[0, 0, 0, 0]) and not numpy.isnan(out[0, 0, 1:, 1:]).any()


def test_avgpool_counts_padding_in_divisor():
    x = numpy.ones((1, 1, 2, 2))
    out, _ = avgpool2d_forward(x, 2, stride=1, padding=1)
    # corners see one real pixel out of 4, edges 2, the centre 4
    numpy.testing.assert_allclose(out[0, 0], [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])


def test_global_avgpool_is_the_channel_mean(rng):
    x = rng.standard_normal((3, 4, 5, 6))
    out, cache = global_avgpool_forward(x)
    assert out.shape == (3, 4, 1, 1)
    numpy.testing.assert_allclose(out[:, :, 0, 0], x.reshape(3, 4, -1).mean(axis=2), rtol=1e-14)
    dx = global_avgpool_backward(numpy.ones((3, 4, 1, 1)), cache)
    numpy.testing.assert_allclose(dx, numpy.full(x.shape, 1 / 30), rtol=1e-14)


# --------------------------------------------------------------------------
# gradient checks
# --------------------------------------------------------------------------
@pytest.mark.maxpool2d_backward
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("impl", ["fast", "naive"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=_ids)
def test_gradient_check(kind, impl, case, rng):
    forward, backward = POOLS[kind][:2] if impl == "fast" else POOLS[kind][2:]
    shape, kernel, stride, padding = case
    x = _distinct(rng, shape)
    out, cache = forward(x, kernel, stride, padding)
    dout = rng.standard_normal(out.shape)
    dx = backward(dout, cache)
    errors = check_gradients(lambda: forward(x, kernel, stride, padding)[0], {"x": x}, {"x": dx}, dout)
    assert errors["x"] < 1e-7, errors


def test_global_avgpool_gradient_check(rng):
    x = rng.standard_normal((2, 3, 5, 4))
    out, cache = global_avgpool_forward(x)
    dout = rng.standard_normal(out.shape)
    dx = global_avgpool_backward(dout, cache)
    errors = check_gradients(lambda: global_avgpool_forward(x)[0], {"x": x}, {"x": dx}, dout)
    assert errors["x"] < 1e-7, errors


# --------------------------------------------------------------------------
# parity with PyTorch
# --------------------------------------------------------------------------
def _torch_pool(torch, kind, tx, kernel, stride, padding):
    F = torch.nn.functional
    stride = kernel if stride is None else stride
    if kind == "max":
        return F.max_pool2d(tx, kernel, stride, padding)
    return F.avg_pool2d(tx, kernel, stride, padding)  # count_include_pad=True by default


@pytest.mark.maxpool2d_backward
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype,tol", [(numpy.float64, 1e-9), (numpy.float32, 1e-6)])
@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_torch_parity(kind, case, dtype, tol, values, rng):
    torch = pytest.importorskip("torch")
    forward, backward = POOLS[kind][:2]
    shape, kernel, stride, padding = case
    if values == "ties":
        x = rng.integers(0, 3, shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    out, cache = forward(x, kernel, stride, padding)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = backward(dout, cache)

    tx = torch.tensor(x, requires_grad=True)
    tout = _torch_pool(torch, kind, tx, kernel, stride, padding)
    tout.backward(torch.tensor(dout))
    assert out.dtype == dx.dtype == dtype
    assert out.shape == tuple(tout.shape)
    assert rel_error(out, tout.detach().numpy()) <= tol
    assert rel_error(dx, tx.grad.numpy()) <= tol


@pytest.mark.parametrize("dtype,tol", [(numpy.float64, 1e-9), (numpy.float32, 1e-6)])
def test_global_avgpool_torch_parity(dtype, tol, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 8, 7, 5)).astype(dtype)
    out, cache = global_avgpool_forward(x)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = global_avgpool_backward(dout, cache)
    tx = torch.tensor(x, requires_grad=True)
    tout = torch.nn.functional.adaptive_avg_pool2d(tx, 1)
    tout.backward(torch.tensor(dout))
    assert out.dtype == dx.dtype == dtype
    assert rel_error(out, tout.detach().numpy()) <= tol
    assert rel_error(dx, tx.grad.numpy()) <= tol


# --------------------------------------------------------------------------
# dtypes, backends
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("kind", ["max", "avg", "global"])
def test_dtype_and_backend_kept(kind, dtype, xp, rng):
    x_host = rng.standard_normal((2, 3, 7, 7)).astype(dtype)
    x = backend.to_device(x_host)
    if kind == "global":
        out, cache = global_avgpool_forward(x)
        dx = global_avgpool_backward(xp.ones_like(out), cache)
        ref_out, ref_cache = global_avgpool_forward(x_host)
        ref_dx = global_avgpool_backward(numpy.ones_like(ref_out), ref_cache)
    else:
        forward, backward = POOLS[kind][:2]
        out, cache = forward(x, 3, 2, 1)
        dx = backward(xp.ones_like(out), cache)
        ref_out, ref_cache = forward(x_host, 3, 2, 1)
        ref_dx = backward(numpy.ones_like(ref_out), ref_cache)
    for a, ref in [(out, ref_out), (dx, ref_dx)]:
        assert a.dtype == dtype
        assert backend.get_array_module(a) is xp
        assert rel_error(backend.to_numpy(a), ref) < 1e-6


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("impl", [0, 2])  # fast, naive
@pytest.mark.parametrize("shape,kernel,stride,padding,match", [
    ((3, 8, 8), 2, None, 0, r"x of shape \(N, C, H, W\), got shape \(3, 8, 8\)"),
    ((2, 3, 4, 4), 5, None, 0, r"kernel 5x5 is larger than the padded input 4x4 .*\(2, 3, 4, 4\)"),
    ((2, 3, 8, 8), 3, None, 2, r"padding \(2, 2\) must be at most half the kernel size \(3, 3\)"),
    ((2, 3, 8, 8), 0, None, 0, r"kernel_size must be >= 1"),
    ((2, 3, 8, 8), 2, 0, 0, r"stride must be >= 1"),
    ((2, 3, 8, 8), 2, None, -1, r"padding must be >= 0"),
])
def test_bad_arguments_raise(kind, impl, shape, kernel, stride, padding, match):
    forward = POOLS[kind][impl]
    with pytest.raises(ValueError, match=match):
        forward(numpy.zeros(shape), kernel, stride, padding)


@pytest.mark.maxpool2d_backward
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("impl", [0, 2])  # fast, naive
def test_backward_checks_dout_shape(kind, impl, rng):
    forward, backward = POOLS[kind][impl:impl + 2]
    _, cache = forward(rng.standard_normal((2, 3, 8, 8)), 2)
    with pytest.raises(ValueError, match=r"expected dout of shape \(2, 3, 4, 4\).*got shape \(2, 3, 4, 3\)"):
        backward(numpy.zeros((2, 3, 4, 3)), cache)


def test_global_avgpool_errors():
    with pytest.raises(ValueError, match=r"got shape \(3, 4\)"):
        global_avgpool_forward(numpy.zeros((3, 4)))
    _, cache = global_avgpool_forward(numpy.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"expected dout of shape \(2, 3, 1, 1\).*got shape \(2, 3\)"):
        global_avgpool_backward(numpy.zeros((2, 3)), cache)
