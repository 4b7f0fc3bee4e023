"""Textbook ops (minires/functional/) other than conv and pooling: BatchNorm, ReLU, Linear, flatten,
softmax cross-entropy and the residual add. Gradient checks use float64, a
random upstream gradient and centered differences (minires.gradcheck)."""
import numpy
import pytest

from minires import functional as F
from minires.gradcheck import check_gradients, rel_error

TOL = 1e-7


def bn_inputs(xp, rng, shape=(4, 3, 5, 6)):
    c = shape[1]
    x = xp.asarray(rng.normal(2.0, 3.0, shape))
    gamma = xp.asarray(rng.normal(1.0, 0.5, c))
    beta = xp.asarray(rng.normal(0.0, 0.5, c))
    return x, gamma, beta, xp.asarray(rng.normal(0, 1, c)), xp.asarray(rng.uniform(0.5, 2, c))


@pytest.mark.batchnorm2d_backward
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradcheck(xp, rng, training):
    x, gamma, beta, rm, rv = bn_inputs(xp, rng)

    def forward():
        # running stats are passed as copies: held fixed while the batch stats are live
        return F.batchnorm2d_forward(x, gamma, beta, rm.copy(), rv.copy(), training=training)[0]

    out = forward()
    dout = xp.asarray(rng.standard_normal(out.shape))
    _, cache = F.batchnorm2d_forward(x, gamma, beta, rm.copy(), rv.copy(), training=training)
    dx, dgamma, dbeta = F.batchnorm2d_backward(dout, cache)
    errors = check_gradients(forward, {"x": x, "gamma": gamma, "beta": beta},
                             {"x": dx, "gamma": dgamma, "beta": dbeta}, dout)
    assert max(errors.values()) < TOL, errors


@pytest.mark.batchnorm2d_backward
def test_batchnorm_dx_is_not_trivial(rng):
    """With a random upstream gradient, training-mode dx is far from zero (an
    all-ones upstream gradient would make it exactly zero and hide bugs)."""
    x, gamma, beta, rm, rv = bn_inputs(numpy, rng)
    _, cache = F.batchnorm2d_forward(x, gamma, beta, rm, rv)
    dx, _, _ = F.batchnorm2d_backward(rng.standard_normal(x.shape), cache)
    assert numpy.abs(dx).max() > 1e-2
    dx_ones, _, _ = F.batchnorm2d_backward(numpy.ones(x.shape), cache)
    assert numpy.abs(dx_ones).max() < 1e-12


@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (4, 3, 5, 6), (7, 1, 1, 2), (2, 5, 4, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_fast_equals_naive(xp, rng, shape, training):
    x, gamma, beta, rm, rv = bn_inputs(xp, rng, shape)
    rm2, rv2 = rm.copy(), rv.copy()
    out, cache = F.batchnorm2d_forward(x, gamma, beta, rm, rv, training=training)
    out_n, cache_n = F.batchnorm2d_forward_naive(x, gamma, beta, rm2, rv2, training=training)
    dout = xp.asarray(rng.standard_normal(shape))
    assert rel_error(out, out_n) < 1e-13
    assert rel_error(rm, rm2) < 1e-13 and rel_error(rv, rv2) < 1e-13
    for a, b in zip(F.batchnorm2d_backward(dout, cache), F.batchnorm2d_backward_naive(dout, cache_n)):
        assert rel_error(a, b) < 1e-12


def test_batchnorm_statistics(rng):
    x, gamma, beta, _, _ = bn_inputs(numpy, rng)
    rm, rv = numpy.zeros(3), numpy.ones(3)
    out, _ = F.batchnorm2d_forward(x, numpy.ones(3), numpy.zeros(3), rm, rv, momentum=0.1)
    # Normalized with the biased variance: per-channel mean 0, variance ~1
    assert numpy.allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert numpy.allclose(out.var(axis=(0, 2, 3)), 1, atol=1e-3)
    # Running variance tracks the unbiased batch variance
    m = x.size // 3
    unbiased = x.var(axis=(0, 2, 3)) * m / (m - 1)
    assert numpy.allclose(rv, 0.9 + 0.1 * unbiased)
    assert numpy.allclose(rm, 0.1 * x.mean(axis=(0, 2, 3)))


def test_batchnorm_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 4, 5, 5\)"):
        F.batchnorm2d_forward(numpy.zeros((2, 4, 5, 5)), numpy.ones(3), numpy.zeros(3), numpy.zeros(3), numpy.ones(3))
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batchnorm2d_forward(numpy.zeros((1, 3, 1, 1)), numpy.ones(3), numpy.zeros(3), numpy.zeros(3), numpy.ones(3))


@pytest.mark.relu_backward
def test_relu_gradcheck(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4, 5)))
    x[xp.abs(x) < 1e-3] = 0.5  # keep away from the kink, where the derivative jumps
    out, cache = F.relu_forward(x)
    dout = xp.asarray(rng.standard_normal(out.shape))
    errors = check_gradients(lambda: F.relu_forward(x)[0], {"x": x}, {"x": F.relu_backward(dout, cache)}, dout)
    assert errors["x"] < TOL
    assert float(out.min()) >= 0


@pytest.mark.linear_backward
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck_and_naive(xp, rng, bias):
    x = xp.asarray(rng.standard_normal((5, 7)))
    w = xp.asarray(rng.standard_normal((3, 7)))
    b = xp.asarray(rng.standard_normal(3)) if bias else None
    out, cache = F.linear_forward(x, w, b)
    assert rel_error(out, F.linear_forward_naive(x, w, b)[0]) < 1e-13
    dout = xp.asarray(rng.standard_normal(out.shape))
    dx, dw, db = F.linear_backward(dout, cache)
    arrays, grads = {"x": x, "w": w}, {"x": dx, "w": dw}
    if bias:
        arrays["b"], grads["b"] = b, db
    else:
        assert db is None
    errors = check_gradients(lambda: F.linear_forward(x, w, b)[0], arrays, grads, dout)
    assert max(errors.values()) < TOL, errors


def test_linear_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 7\).*\(5, 6\)"):
        F.linear_forward(numpy.zeros((5, 6)), numpy.zeros((3, 7)))


def test_flatten_roundtrip(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    out, cache = F.flatten_forward(x)
    assert out.shape == (2, 60)
    assert F.flatten_backward(out, cache).shape == x.shape


@pytest.mark.softmax_cross_entropy_forward
@pytest.mark.softmax_cross_entropy_backward
def test_softmax_cross_entropy_gradcheck_and_naive(xp, rng):
    logits = xp.asarray(rng.standard_normal((6, 5)) * 3)
    labels = xp.asarray(rng.integers(0, 5, 6))
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    loss_n, cache_n = F.softmax_cross_entropy_forward_naive(logits, labels)
    assert rel_error(loss, loss_n) < 1e-13
    assert rel_error(cache[0], cache_n[0]) < 1e-13
    dloss = 0.7  # a random-ish scalar upstream gradient
    dlogits = F.softmax_cross_entropy_backward(dloss, cache)
    errors = check_gradients(lambda: F.softmax_cross_entropy_forward(logits, labels)[0],
                             {"logits": logits}, {"logits": dlogits}, xp.asarray(dloss))
    assert errors["logits"] < TOL


@pytest.mark.softmax_cross_entropy_forward
def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = numpy.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], dtype=numpy.float32)
    labels = numpy.array([1, 2])
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    assert numpy.isfinite(loss) and abs(float(loss) - 1e4) < 1
    assert numpy.all(numpy.isfinite(F.softmax_cross_entropy_backward(1.0, cache)))


def test_softmax_cross_entropy_bad_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        F.softmax_cross_entropy_forward(numpy.zeros((2, 3)), numpy.array([0, 3]))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        F.softmax_cross_entropy_forward(numpy.zeros((2, 3)), numpy.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integers"):
        F.softmax_cross_entropy_forward(numpy.zeros((2, 3)), numpy.array([0.0, 1.0]))


def test_residual_add_fans_gradient_out(rng):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    out, cache = F.add_forward(a, b)
    assert numpy.array_equal(out, a + b)
    dout = rng.standard_normal((2, 3))
    da, db = F.add_backward(dout, cache)
    assert da is dout and db is dout
    with pytest.raises(ValueError, match="branch shape"):
        F.add_forward(a, rng.standard_normal((3, 2)))


def test_float32_stays_float32(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(numpy.float32)
    c = numpy.ones(3, numpy.float32)
    out, cache = F.batchnorm2d_forward(x, c, c * 0, c * 0, c.copy())
    assert out.dtype == numpy.float32
    assert all(g.dtype == numpy.float32 for g in F.batchnorm2d_backward(out, cache))
    assert F.relu_forward(x)[0].dtype == numpy.float32
    loss, cache = F.softmax_cross_entropy_forward(x.reshape(2, -1), numpy.array([0, 1]))
    assert loss.dtype == numpy.float32
    assert F.softmax_cross_entropy_backward(1.0, cache).dtype == numpy.float32
