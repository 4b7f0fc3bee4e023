"""conv2d: textbook (im2col) and engine == naive loops, gradient checks, PyTorch parity, errors.

The naive version is the reference: it is the formula as loops. Every test of
the vectorized op runs on the textbook (minires/functional/conv.py) and on the
engine (minires/kernels/conv.py). The engine has three code paths worth
covering separately: "same" convolutions at stride 1 (the shifted-line trick,
whose dx is another "same" convolution), every other geometry (strided-view
im2col / col2im), and the batch split into chunks (forced here by shrinking
CHUNK_BYTES).
"""
import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minires import backend
from minires.functional import conv as textbook
from minires.functional.conv import conv2d_backward_naive, conv2d_forward_naive
from minires.kernels import conv as engine
from minires.gradcheck import check_gradients, rel_error

# (N, C, H, W, F, kernel (kh, kw), stride, padding, bias)
CASES = [
    (2, 3, 7, 7, 4, (3, 3), 1, 0, True),
    (2, 3, 7, 7, 4, (3, 3), 1, 1, False),
    (2, 3, 7, 7, 4, (3, 3), 1, 2, True),
    (2, 3, 8, 8, 4, (3, 3), 2, 0, False),
    (2, 3, 9, 9, 4, (3, 3), 2, 1, True),
    (2, 3, 9, 9, 4, (3, 3), 2, 2, False),
    (2, 3, 6, 6, 4, (1, 1), 1, 0, True),    # 1x1
    (2, 3, 7, 7, 4, (1, 1), 2, 0, False),   # 1x1 stride 2 (ResNet projection)
    (2, 2, 5, 5, 3, (1, 1), 1, 1, True),    # 1x1 with padding
    (2, 3, 6, 7, 2, (2, 3), 1, 1, True),    # non-square kernel and input
    (2, 3, 7, 6, 2, (3, 1), 2, 1, False),
    (1, 3, 5, 9, 4, (3, 3), 1, 1, True),    # batch 1, non-square odd input
    (1, 2, 9, 5, 3, (3, 3), 2, 0, True),
    (2, 2, 8, 7, 3, (3, 2), (2, 1), (1, 0), True),  # asymmetric stride / padding
    (2, 2, 7, 8, 3, (2, 2), (1, 3), (0, 2), False),
    (2, 2, 8, 8, 3, (2, 2), 3, 0, True),    # stride > kernel: some pixels unused
    (2, 2, 4, 5, 3, (4, 5), 1, 0, True),    # kernel == input: a single output
    (2, 1, 3, 3, 2, (5, 5), 1, 1, False),   # kernel == padded input
    # "same" convolutions (stride 1, 2*padding = kernel - 1): the shifted-line path;
    # dw comes from dout's columns where C >= F, from x's columns where C < F
    (2, 3, 6, 5, 2, (3, 1), 1, (1, 0), True),
    (2, 2, 5, 6, 3, (1, 3), 1, (0, 1), False),
    (2, 2, 7, 6, 3, (5, 3), 1, (2, 1), True),
    (1, 2, 2, 2, 2, (3, 3), 1, 1, True),    # 2x2 image: every window hangs over an edge
    (2, 2, 1, 1, 2, (3, 3), 1, 1, False),   # 1x1 image
    (1, 2, 1, 2, 3, (5, 5), 1, 2, True),    # kernel reaches past the image on both sides
    (2, 2, 2, 3, 2, (7, 3), 1, (3, 1), True),  # ... by more than the image's height
    (2, 4, 6, 5, 2, (5, 5), 1, 2, True),    # C > F, kernel 5x5
    (2, 4, 5, 6, 3, (1, 1), 1, 0, False),   # 1x1, C > F
    (3, 3, 6, 6, 3, (3, 3), 1, 1, False),   # C == F, as in a ResNet block
]


def _ids(case):
    N, C, H, W, F, k, s, p, b = case
    return f"n{N}c{C}_{H}x{W}_f{F}_k{k[0]}x{k[1]}_s{s}_p{p}_{'b' if b else 'nob'}"


def _make(rng, case, dtype=numpy.float64):
    N, C, H, W, F, (kh, kw), stride, padding, bias = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    return x, w, b, stride, padding


TIERS = ("textbook", "engine", "engine_tiny_chunks")


@pytest.fixture(params=TIERS)
def impl(request, monkeypatch):
    """The module whose conv2d runs: the textbook, or the engine on the whole
    batch at once and one image at a time."""
    if request.param == "engine_tiny_chunks":
        monkeypatch.setattr(engine, "CHUNK_BYTES", 1)
    return textbook if request.param == "textbook" else engine


def _tier(name):
    """For hypothesis tests (no fixtures): (module, CHUNK_BYTES to use)."""
    return (textbook, engine.CHUNK_BYTES) if name == "textbook" else (
        engine, 1 if name == "engine_tiny_chunks" else engine.CHUNK_BYTES)


def _assert_close(actual, expected, tol=1e-12):
    assert actual.shape == expected.shape
    assert rel_error(actual, expected) < tol


# --------------------------------------------------------------------------
# fast == naive
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fast_matches_naive(case, impl, rng):
    x, w, b, stride, padding = _make(rng, case)
    out, cache = impl.conv2d_forward(x, w, b, stride, padding)
    out_naive, cache_naive = conv2d_forward_naive(x, w, b, stride, padding)
    _assert_close(out, out_naive)

    dout = rng.standard_normal(out.shape)
    dx, dw, db = impl.conv2d_backward(dout, cache)
    dx_n, dw_n, db_n = conv2d_backward_naive(dout, cache_naive)
    _assert_close(dx, dx_n)
    _assert_close(dw, dw_n)
    if b is None:
        assert db is None and db_n is None
    else:
        _assert_close(db, db_n)


def test_output_size_formula(impl, rng):
    x = rng.standard_normal((2, 3, 11, 8))
    w = rng.standard_normal((5, 3, 3, 2))
    out, _ = impl.conv2d_forward(x, w, stride=(2, 3), padding=(1, 2))
    assert out.shape == (2, 5, (11 + 2 - 3) // 2 + 1, (8 + 4 - 2) // 3 + 1)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 3), f=st.integers(1, 3),
    h=st.integers(1, 8), w=st.integers(1, 8),
    kh=st.integers(1, 4), kw=st.integers(1, 4),
    sh=st.integers(1, 3), sw=st.integers(1, 3),
    ph=st.integers(0, 2), pw=st.integers(0, 2),
    bias=st.booleans(), tier=st.sampled_from(TIERS),
    seed=st.integers(0, 2**16), input_grad=st.booleans(),
)
def test_fast_matches_naive_random_shapes(n, c, f, h, w, kh, kw, sh, sw, ph, pw, bias, tier, seed,
                                          input_grad):
    if kh > h + 2 * ph or kw > w + 2 * pw:
        return  # invalid geometry, covered by the error tests
    gen = numpy.random.default_rng(seed)
    x = gen.standard_normal((n, c, h, w))
    wt = gen.standard_normal((f, c, kh, kw))
    b = gen.standard_normal(f) if bias else None
    impl, chunk = _tier(tier)
    saved, engine.CHUNK_BYTES = engine.CHUNK_BYTES, chunk
    try:
        out, cache = impl.conv2d_forward(x, wt, b, (sh, sw), (ph, pw))
        dout = gen.standard_normal(out.shape)
        grads = impl.conv2d_backward(dout, cache, input_grad=input_grad)
    finally:
        engine.CHUNK_BYTES = saved
    out_n, cache_n = conv2d_forward_naive(x, wt, b, (sh, sw), (ph, pw))
    grads_n = conv2d_backward_naive(dout, cache_n)
    _assert_close(out, out_n)
    if not input_grad:
        assert grads[0] is None
        grads, grads_n = grads[1:], grads_n[1:]
    for g, g_n in zip(grads, grads_n):
        if g is None:
            assert g_n is None
        else:
            _assert_close(g, g_n)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 5), f=st.integers(1, 5),
    h=st.integers(1, 7), w=st.integers(1, 7),
    kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]),
    tier=st.sampled_from(TIERS), seed=st.integers(0, 2**16), input_grad=st.booleans(),
)
def test_same_convolutions_match_naive(n, c, f, h, w, kh, kw, tier, seed, input_grad):
    """Random "same" convolutions (stride 1, padding (k - 1) / 2): the shifted-line
    path, with dw from dout's columns (C >= F) or from x's (C < F)."""
    gen = numpy.random.default_rng(seed)
    x, wt = gen.standard_normal((n, c, h, w)), gen.standard_normal((f, c, kh, kw))
    padding = ((kh - 1) // 2, (kw - 1) // 2)
    impl, chunk = _tier(tier)
    saved, engine.CHUNK_BYTES = engine.CHUNK_BYTES, chunk
    try:
        out, cache = impl.conv2d_forward(x, wt, None, 1, padding)
        dout = gen.standard_normal(out.shape)
        dx, dw, _ = impl.conv2d_backward(dout, cache, input_grad=input_grad)
    finally:
        engine.CHUNK_BYTES = saved
    dx_n, dw_n, _ = conv2d_backward_naive(dout, conv2d_forward_naive(x, wt, None, 1, padding)[1])
    _assert_close(dw, dw_n)
    if input_grad:
        _assert_close(dx, dx_n)
    else:
        assert dx is None


# --------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,stride,padding", [
    ((3, 3), 1, 1), ((2, 3), (2, 1), (0, 2)), ((1, 1), 2, 0), ((3, 2), 2, 1),
])
def test_im2col_layout(kernel, stride, padding, impl, rng):
    """cols[(c, i, j), (n, y, x)] = x_pad[n, c, y*sh + i, x*sw + j], entry by entry."""
    kh, kw = kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    x = rng.standard_normal((2, 3, 6, 7))
    cols = impl.im2col(x, kh, kw, stride, padding)
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    assert cols.shape == (C * kh * kw, N * Ho * Wo)
    x_pad = numpy.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    expected = numpy.empty_like(cols)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                for n in range(N):
                    for y in range(Ho):
                        for xx in range(Wo):
                            row = (c * kh + i) * kw + j
                            column = (n * Ho + y) * Wo + xx
                            expected[row, column] = x_pad[n, c, y * sh + i, xx * sw + j]
    numpy.testing.assert_array_equal(cols, expected)


@pytest.mark.parametrize("kernel,stride,padding", [
    ((3, 3), 1, 1), ((3, 3), 2, 1), ((2, 3), (2, 1), (0, 2)), ((1, 1), 2, 0), ((2, 2), 3, 0),
])
def test_col2im_is_adjoint_of_im2col(kernel, stride, padding, impl, rng):
    """<im2col(x), c> == <x, col2im(c)>: col2im adds overlapping windows back."""
    kh, kw = kernel
    x = rng.standard_normal((2, 3, 7, 8))
    cols = impl.im2col(x, kh, kw, stride, padding)
    c = rng.standard_normal(cols.shape)
    dx = impl.col2im(c, x.shape, kh, kw, stride, padding)
    assert dx.shape == x.shape
    assert abs(numpy.sum(cols * c) - numpy.sum(x * dx)) < 1e-10 * numpy.abs(cols * c).sum()


def test_col2im_counts_overlaps(impl):
    """col2im of all-ones columns counts how many windows cover each pixel."""
    x_shape = (1, 1, 4, 4)
    cols = numpy.ones((9, 4))  # 3x3 kernel, stride 1, no padding: 2x2 outputs
    counts = impl.col2im(cols, x_shape, 3, 3, 1, 0)[0, 0]
    expected = numpy.array([[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])
    numpy.testing.assert_array_equal(counts, expected)


# --------------------------------------------------------------------------
# gradient checks (float64, random upstream gradient, centered differences)
# --------------------------------------------------------------------------
@pytest.mark.conv2d_backward
@pytest.mark.parametrize("case", [
    (2, 3, 5, 6, 4, (3, 3), 1, 1, True),
    (2, 2, 7, 5, 3, (3, 2), 2, 1, True),
    (1, 3, 6, 6, 2, (1, 1), 2, 0, False),
    (2, 2, 6, 7, 3, (2, 3), (2, 1), (1, 2), True),
], ids=_ids)
@pytest.mark.parametrize("impl_name", ["textbook", "naive"])
def test_gradient_check(case, impl_name, rng):
    forward, backward = {
        "textbook": (textbook.conv2d_forward, textbook.conv2d_backward),
        "naive": (conv2d_forward_naive, conv2d_backward_naive),
    }[impl_name]
    x, w, b, stride, padding = _make(rng, case)
    arrays = {"x": x, "w": w} if b is None else {"x": x, "w": w, "b": b}
    out, cache = forward(x, w, b, stride, padding)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = backward(dout, cache)
    analytic = {"x": dx, "w": dw, "b": db}
    errors = check_gradients(lambda: forward(x, w, b, stride, padding)[0], arrays, analytic, dout)
    assert max(errors.values()) < 1e-7, errors


# --------------------------------------------------------------------------
# parity with PyTorch
# --------------------------------------------------------------------------
PARITY_CASES = [
    (4, 3, 8, 8, 5, (3, 3), 1, 1, True),
    (3, 4, 9, 7, 6, (3, 3), 2, 1, False),
    (2, 4, 8, 8, 6, (1, 1), 2, 0, False),
    (2, 3, 7, 9, 4, (2, 3), (2, 1), (1, 0), True),
    (8, 16, 16, 16, 16, (3, 3), 1, 1, False),  # a ResNet-shaped layer
]


@pytest.mark.conv2d_backward
@pytest.mark.parametrize("case", PARITY_CASES, ids=_ids)
@pytest.mark.parametrize("dtype,tol", [(numpy.float64, 1e-9), (numpy.float32, 1e-5)])
def test_torch_parity(case, dtype, tol, rng):
    impl = textbook
    torch = pytest.importorskip("torch")
    x, w, b, stride, padding = _make(rng, case, dtype)
    out, cache = impl.conv2d_forward(x, w, b, stride, padding)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = impl.conv2d_backward(dout, cache)

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if b is not None else None
    tout = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=padding)
    tout.backward(torch.tensor(dout))

    for ours, theirs in [(out, tout.detach()), (dx, tx.grad), (dw, tw.grad)] + (
            [(db, tb.grad)] if b is not None else []):
        assert ours.dtype == dtype
        assert ours.shape == tuple(theirs.shape)
        assert rel_error(ours, theirs.numpy()) <= tol


# --------------------------------------------------------------------------
# dtypes and backends
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_dtype_is_kept(dtype, stride, impl, xp, rng):
    x, w, b, _, padding = _make(rng, (2, 3, 6, 6, 4, (3, 3), stride, 1, True), dtype)
    x, w, b = (backend.to_device(a) for a in (x, w, b))
    out, cache = impl.conv2d_forward(x, w, b, stride, padding)
    dx, dw, db = impl.conv2d_backward(xp.ones_like(out), cache)
    for a in (out, dx, dw, db):
        assert a.dtype == dtype
        assert backend.get_array_module(a) is xp
    assert out.flags.c_contiguous


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[13]], ids=_ids)
def test_backend_matches_numpy(case, impl, xp, rng):
    """Same numbers on every backend (CuPy where available)."""
    x, w, b, stride, padding = _make(rng, case)
    out_ref, cache_ref = impl.conv2d_forward(x, w, b, stride, padding)
    dout = rng.standard_normal(out_ref.shape)
    grads_ref = impl.conv2d_backward(dout, cache_ref)
    dev = [None if a is None else backend.to_device(a) for a in (x, w, b, dout)]
    out, cache = impl.conv2d_forward(dev[0], dev[1], dev[2], stride, padding)
    grads = impl.conv2d_backward(dev[3], cache)
    _assert_close(backend.to_numpy(out), out_ref)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            _assert_close(backend.to_numpy(g), g_ref)


def _is_same_case(case):
    _, _, _, _, _, (kh, kw), stride, padding, _ = case
    pad = padding if isinstance(padding, tuple) else (padding, padding)
    return stride == 1 and 2 * pad[0] == kh - 1 and 2 * pad[1] == kw - 1


@pytest.mark.conv2d_backward
@pytest.mark.parametrize("case", [c for c in CASES if _is_same_case(c)] + [CASES[4]], ids=_ids)
def test_input_grad_false_skips_dx_only(case, impl, xp, rng):
    """input_grad=False: dx is None, dw and db are those of the full backward
    (every "same" case: C < F, C > F and C == F; one general case; CuPy where available)."""
    x, w, b, stride, padding = _make(rng, case)
    x, w, b = (None if a is None else backend.to_device(a) for a in (x, w, b))
    out, cache = impl.conv2d_forward(x, w, b, stride, padding)
    dout = backend.to_device(rng.standard_normal(out.shape))
    dx, dw, db = impl.conv2d_backward(dout, cache)
    no_dx, dw_only, db_only = impl.conv2d_backward(dout, cache, input_grad=False)
    assert dx is not None and no_dx is None
    _assert_close(backend.to_numpy(dw_only), backend.to_numpy(dw))
    if b is not None:
        _assert_close(backend.to_numpy(db_only), backend.to_numpy(db))


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize("forward", [textbook.conv2d_forward, engine.conv2d_forward, conv2d_forward_naive])
@pytest.mark.parametrize("x_shape,w_shape,b_shape,stride,padding,match", [
    ((3, 8, 8), (4, 3, 3, 3), None, 1, 0, r"x of shape \(N, C, H, W\), got shape \(3, 8, 8\)"),
    ((2, 3, 8, 8), (4, 3, 3), None, 1, 0, r"w of shape \(F, C, kh, kw\), got shape \(4, 3, 3\)"),
    ((2, 3, 8, 8), (4, 2, 3, 3), None, 1, 0,
     r"w of shape \(4, 2, 3, 3\) expects 2 input channels, got x of shape \(2, 3, 8, 8\)"),
    ((2, 3, 4, 4), (4, 3, 5, 5), None, 1, 0,
     r"kernel 5x5 .*\(4, 3, 5, 5\).* padded input 4x4 .*\(2, 3, 4, 4\)"),
    ((2, 3, 4, 4), (4, 3, 3, 7), None, 1, 1, r"kernel 3x7 .* padded input 6x6"),
    ((2, 3, 8, 8), (4, 3, 3, 3), (3,), 1, 0, r"bias of shape \(4,\) .*got shape \(3,\)"),
    ((2, 3, 8, 8), (4, 3, 3, 3), (4, 1), 1, 0, r"bias of shape \(4,\) .*got shape \(4, 1\)"),
    ((2, 3, 8, 8), (4, 3, 3, 3), None, 0, 0, r"stride must be >= 1"),
    ((2, 3, 8, 8), (4, 3, 3, 3), None, 1, -1, r"padding must be >= 0"),
    ((2, 3, 8, 8), (4, 3, 3, 3), None, (1, 2, 3), 0, r"stride must be an int or a pair"),
])
def test_bad_shapes_raise(forward, x_shape, w_shape, b_shape, stride, padding, match):
    x, w = numpy.zeros(x_shape), numpy.zeros(w_shape)
    b = None if b_shape is None else numpy.zeros(b_shape)
    with pytest.raises(ValueError, match=match):
        forward(x, w, b, stride, padding)


@pytest.mark.conv2d_backward
@pytest.mark.parametrize("forward,backward", [
    (textbook.conv2d_forward, textbook.conv2d_backward), (engine.conv2d_forward, engine.conv2d_backward),
    (conv2d_forward_naive, conv2d_backward_naive),
])
def test_backward_checks_dout_shape(forward, backward, rng):
    x, w, b, stride, padding = _make(rng, CASES[0])
    out, cache = forward(x, w, b, stride, padding)
    with pytest.raises(ValueError, match=r"expected dout of shape \(2, 4, 5, 5\).*got shape \(2, 4, 5, 4\)"):
        backward(numpy.zeros((2, 4, 5, 4)), cache)
