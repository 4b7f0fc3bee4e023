"""The engine (minires/kernels/) equals the textbook (minires/functional/), op by op.

Every op the engine has is run beside the textbook op of the same name, in
the forward and in every gradient, on the geometry set (stride 1/2/3,
padding 0/1/2, non-square kernels and inputs, odd sizes, batch 1), in
float32 and float64, on NumPy and on the CuPy stand-in / a GPU (the ``xp``
fixture). Caches are swapped too: the engine's forward with the textbook's
backward and the reverse, so a student copy may mix the two tiers per op.
Then the seam (minires/ops.py): what it runs, and whole models with both.
"""
import os
import subprocess
import sys

import numpy
import pytest

from minires import backend, functional, ops
from minires.kernels import ENGINE
from minires.kernels import conv as engine_conv
from minires.kernels.parallel import chunks_of

# (N, C, H, W, F, (kh, kw), stride, padding, bias)
CONV_CASES = [
    (2, 3, 7, 7, 4, (3, 3), 1, 1, False),      # a ResNet 3x3 ("same", the engine's fast route)
    (2, 3, 7, 7, 4, (3, 3), 1, 0, True),
    (2, 3, 7, 7, 4, (3, 3), 1, 2, True),
    (2, 3, 9, 9, 4, (3, 3), 2, 1, False),      # ResNet's downsampling 3x3
    (2, 3, 7, 7, 4, (1, 1), 2, 0, False),      # ResNet's projection 1x1
    (2, 4, 6, 6, 2, (1, 1), 1, 0, True),       # 1x1 "same", C > F
    (1, 3, 5, 9, 4, (3, 3), 1, 1, True),       # batch 1, non-square odd input
    (2, 3, 6, 7, 2, (2, 3), 1, 1, True),       # non-square kernel
    (2, 2, 8, 7, 3, (3, 2), (2, 1), (1, 0), True),
    (2, 2, 8, 8, 3, (2, 2), 3, 0, True),       # stride 3 > kernel
    (1, 2, 9, 7, 3, (3, 3), 3, 2, False),      # stride 3, padding 2
    (2, 2, 7, 6, 3, (5, 3), 1, (2, 1), True),  # "same" with a 5x3 kernel
    (3, 1, 5, 5, 2, (3, 3), 1, 1, False),      # C < F: the engine's dw from x's columns
]
DTYPES = [(numpy.float64, 1e-12), (numpy.float32, 1e-5)]


def _ids(case):
    N, C, H, W, F, k, s, p, b = case
    return f"n{N}c{C}_{H}x{W}_f{F}_k{k[0]}x{k[1]}_s{s}_p{p}_{'b' if b else 'nob'}"


def _close(actual, expected, tol):
    actual, expected = backend.to_numpy(actual), backend.to_numpy(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(1.0, float(numpy.abs(expected).max(initial=0)))
    assert float(numpy.abs(actual - expected).max(initial=0)) <= tol * scale


def _all_close(got, expected, tol):
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            _close(a, b, tol)


def _device(rng, shape, dtype, xp):
    return backend.to_device(rng.standard_normal(shape).astype(dtype))


def test_the_engine_only_replaces_ops_the_textbook_has():
    assert set(ENGINE) <= set(ops.OPS)
    for name in ops.OPS:
        assert callable(getattr(functional, name)), name


# --------------------------------------------------------------------------
# op by op
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES, ids=_ids)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("chunk", ["whole_batch", "one_image"])
def test_conv2d(case, dtype, tol, chunk, xp, rng, monkeypatch):
    if chunk == "one_image":
        monkeypatch.setattr(engine_conv, "CHUNK_BYTES", 1)
    N, C, H, W, F, (kh, kw), stride, padding, bias = case
    x, w = _device(rng, (N, C, H, W), dtype, xp), _device(rng, (F, C, kh, kw), dtype, xp)
    b = _device(rng, (F,), dtype, xp) if bias else None
    out, cache = ENGINE["conv2d_forward"](x, w, b, stride, padding)
    out_t, cache_t = functional.conv2d_forward(x, w, b, stride, padding)
    _close(out, out_t, tol)
    dout = _device(rng, out.shape, dtype, xp)
    expected = functional.conv2d_backward(dout, cache_t)
    _all_close(ENGINE["conv2d_backward"](dout, cache), expected, tol)
    _all_close(ENGINE["conv2d_backward"](dout, cache_t), expected, tol)  # caches swap
    _all_close(functional.conv2d_backward(dout, cache), expected, tol)
    no_dx = ENGINE["conv2d_backward"](dout, cache, input_grad=False)
    assert no_dx[0] is None
    _all_close(no_dx[1:], expected[1:], tol)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 3), (7, 1, 1, 2), (2, 5, 4, 1), (16, 8, 9, 7)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_batchnorm2d(shape, training, dtype, tol, xp, rng):
    C = shape[1]
    x = _device(rng, shape, dtype, xp) * 3 + 2
    gamma, beta = _device(rng, (C,), dtype, xp), _device(rng, (C,), dtype, xp)
    stats = [backend.to_device(rng.uniform(0.5, 2, C).astype(dtype)) for _ in range(2)]
    counts = [backend.to_device(numpy.zeros((), numpy.int64)) for _ in range(2)]
    runs = [[s.copy() for s in stats] for _ in range(2)]
    out, cache = ENGINE["batchnorm2d_forward"](x, gamma, beta, *runs[0], training=training,
                                               num_batches_tracked=counts[0])
    out_t, cache_t = functional.batchnorm2d_forward(x, gamma, beta, *runs[1], training=training,
                                                    num_batches_tracked=counts[1])
    _close(out, out_t, tol)
    _all_close(runs[0], runs[1], tol)  # the running statistics, updated alike
    assert int(counts[0]) == int(counts[1]) == int(training)
    _all_close(cache[:3], cache_t[:3], tol)
    dout = _device(rng, shape, dtype, xp)
    expected = functional.batchnorm2d_backward(dout, cache_t)
    _all_close(ENGINE["batchnorm2d_backward"](dout, cache), expected, tol)
    _all_close(ENGINE["batchnorm2d_backward"](dout, cache_t), expected, tol)
    _all_close(functional.batchnorm2d_backward(dout, cache), expected, tol)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7), (16, 32, 32, 16), (0, 3)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_relu_and_add(shape, dtype, tol, xp, rng):
    x, y = _device(rng, shape, dtype, xp), _device(rng, shape, dtype, xp)
    out, cache = ENGINE["relu_forward"](x)
    out_t, cache_t = functional.relu_forward(x)
    _close(out, out_t, 0)
    dout = _device(rng, shape, dtype, xp)
    _close(ENGINE["relu_backward"](dout, cache), functional.relu_backward(dout, cache_t), 0)
    _close(ENGINE["relu_backward"](dout, cache_t), functional.relu_backward(dout, cache), 0)
    _close(ENGINE["add_forward"](x, y)[0], functional.add_forward(x, y)[0], 0)


def test_engine_and_textbook_refuse_alike():
    a, b = numpy.ones((2, 3)), numpy.ones((1, 3))
    for relu_backward in (ENGINE["relu_backward"], functional.relu_backward):
        with pytest.raises(ValueError, match=r"expected dout of shape \(2, 3\)"):
            relu_backward(b, a)
    for add in (ENGINE["add_forward"], functional.add_forward):
        with pytest.raises(ValueError, match=r"branch shape \(2, 3\) != shortcut shape \(1, 3\)"):
            add(a, b)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_softmax_cross_entropy(dtype, tol, xp, rng):
    logits = _device(rng, (6, 5), dtype, xp) * 3
    labels = backend.to_device(rng.integers(0, 5, 6).astype(numpy.int64))
    loss, cache = ENGINE["softmax_cross_entropy_forward"](logits, labels)
    loss_t, cache_t = functional.softmax_cross_entropy_forward(logits, labels)
    _close(loss, loss_t, tol)
    _close(cache[0], cache_t[0], tol)
    _close(ENGINE["softmax_cross_entropy_backward"](0.7, cache),
           functional.softmax_cross_entropy_backward(0.7, cache_t), tol)


@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.0, 0.0, False), (0.9, 5e-4, False),
                                                            (0.9, 0.0, True)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_sgd_step_zero_grads_and_all_finite(momentum, weight_decay, nesterov, dtype, tol, xp, rng):
    shapes = [(4, 3, 3, 3), (4,), (10, 4)]
    params = [[_device(rng, s, dtype, xp) for s in shapes]]
    params.append([p.copy() for p in params[0]])
    buffers = [None, None]
    for _ in range(3):  # the first step starts the buffers, the others update them
        grads = [_device(rng, s, dtype, xp) for s in shapes]
        saved = [g.copy() for g in grads]
        for k, step in enumerate((ENGINE["sgd_step"], functional.sgd_step)):
            buffers[k] = step(params[k], grads, buffers[k], 0.1, momentum, weight_decay, nesterov)
        _all_close(params[0], params[1], tol)
        _all_close(grads, saved, 0)  # the gradients are only read
        if momentum:
            _all_close(buffers[0], buffers[1], tol)
        else:
            assert buffers == [None, None]
    assert ENGINE["all_finite"](grads) and functional.all_finite(grads)
    grads[1][0] = numpy.nan
    assert not ENGINE["all_finite"](grads) and not functional.all_finite(grads)
    for zero in (ENGINE["zero_grads"], functional.zero_grads):
        zero(grads)
        assert all(float(abs(g).max()) == 0 for g in grads)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_array_by_array_with_a_partial_state(nesterov, xp, rng):
    """A parameter without a buffer yet (added to the optimizer later) beside ones that
    have one: the engine cannot take all in one launch, and goes array by array."""
    shapes = [(4, 3), (5,), (2, 2, 3)]
    params = [[_device(rng, s, numpy.float64, xp) for s in shapes]]
    params.append([p.copy() for p in params[0]])
    grads = [_device(rng, s, numpy.float64, xp) for s in shapes]
    start = [None, _device(rng, (5,), numpy.float64, xp), None]
    buffers = [[None if b is None else b.copy() for b in start] for _ in range(2)]
    for k, step in enumerate((ENGINE["sgd_step"], functional.sgd_step)):
        buffers[k] = step(params[k], grads, buffers[k], 0.1, 0.9, 1e-4, nesterov)
    _all_close(params[0], params[1], 1e-12)
    _all_close(buffers[0], buffers[1], 1e-12)


def test_all_finite_with_a_sum_that_overflows():
    big = numpy.full(4, 3e38, numpy.float32)  # finite, but its sum is inf
    assert ENGINE["all_finite"]([big]) and functional.all_finite([big])


@pytest.mark.engine  # how the engine cuts the work, not a property of the math
def test_residual_add_in_chunks_on_numpy(xp, rng):
    """4 MiB of float32: the engine's sum goes in 4 chunks on NumPy (one operation on CuPy)."""
    a = _device(rng, (16, 32, 32, 64), numpy.float32, xp)
    assert len(chunks_of(xp, a)) == (4 if xp is numpy else 1)
    b = a.astype(xp.float64)  # the dtype that + gives
    mixed, _ = ENGINE["add_forward"](a, b)
    assert mixed.dtype == xp.float64 and bool(xp.all(mixed == a + b))


# --------------------------------------------------------------------------
# the seam
# --------------------------------------------------------------------------
def test_the_seam_picks_each_op():
    assert ops.get_kernels() == "fast"
    with ops.kernels("textbook"):
        assert ops.get_kernels() == "textbook"
        for name in ops.OPS:
            assert ops.implementation(name) is getattr(functional, name)
    for name in ops.OPS:
        fast = ENGINE.get(name) if name not in ops.TEXTBOOK_ONLY else None  # (a student copy lists its parts)
        assert ops.implementation(name) is (fast or getattr(functional, name))
    with pytest.raises(ValueError, match="expected 'fast' or 'textbook'"):
        ops.set_kernels("turbo")
    assert ops.get_kernels() == "fast"


def test_textbook_only_ops_stay_textbook(monkeypatch):
    """A student copy lists its assigned parts: with "fast" they still run the textbook."""
    monkeypatch.setattr(ops, "TEXTBOOK_ONLY", ("relu_backward", "conv2d_backward"))
    try:
        ops.set_kernels("fast")
        assert ops.implementation("relu_backward") is functional.relu_backward
        assert ops.implementation("conv2d_backward") is functional.conv2d_backward
        assert ops.implementation("conv2d_forward") is ENGINE["conv2d_forward"]
    finally:
        monkeypatch.undo()
        ops.set_kernels("fast")
    expected = functional.relu_backward if "relu_backward" in ops.TEXTBOOK_ONLY else ENGINE["relu_backward"]
    assert ops.implementation("relu_backward") is expected  # (a student copy lists relu_backward)


def test_the_environment_variable_chooses():
    code = "from minires import ops; print(ops.get_kernels(), ops.relu_forward.__module__)"
    for value, expected in (("textbook", "textbook minires.functional.activation"),
                            ("fast", "fast minires.kernels.activation")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "MINIRES_KERNELS": value})
        assert out.stdout.strip() == expected
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MINIRES_KERNELS": "turbo"})
    assert bad.returncode != 0 and "MINIRES_KERNELS: unknown kernels 'turbo'" in bad.stderr


@pytest.mark.parametrize("model_name,shape", [("resnet20", (2, 3, 16, 16)), ("resnet50", (2, 3, 32, 32))])
def test_whole_models_agree_under_both_settings(model_name, shape, xp, rng):
    """ResNet-20 and a Bottleneck net, forward and backward in float64: fast == textbook."""
    from minires.models import build_model
    results = {}
    for kind in ops.KINDS:
        backend.manual_seed(0)
        model = build_model(model_name, num_classes=10).astype(numpy.float64)
        x = backend.to_device(numpy.random.default_rng(1).standard_normal(shape))
        with ops.kernels(kind):
            logits = model(x)
            model.zero_grad()
            model.backward(backend.to_device(numpy.random.default_rng(2).standard_normal(logits.shape)))
        results[kind] = (logits, model.named_grads())
    _close(results["fast"][0], results["textbook"][0], 1e-9)
    for name, g in results["textbook"][1].items():  # (ResNet-50's last BatchNorms see 2 values
        _close(results["fast"][1][name], g, 1e-7)   # a channel: gradients of 1e6, ill-conditioned)


# the layout: the textbook knows nothing of the engine, and nothing but the seam chooses

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minires")


def _imports(path):
    """The modules a file imports, as dotted names relative to minires (``kernels.cuda``, ``backend``)."""
    import ast

    folder = os.path.relpath(os.path.dirname(path), PACKAGE).replace(os.sep, ".").strip(".")
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = folder.split(".") if folder else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            module = ".".join(base + ([node.module] if node.module else []))
            names += [f"{module}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _files(*folders):
    for folder in folders:
        for name in sorted(os.listdir(os.path.join(PACKAGE, folder))):
            if name.endswith(".py"):
                yield os.path.join(PACKAGE, folder, name)


@pytest.mark.parametrize("path", list(_files("functional")), ids=os.path.basename)
def test_the_textbook_has_no_engine_in_it(path):
    text = open(path).read()
    assert not [n for n in _imports(path) if n.startswith(("kernels", "parallel", "cupy", "threading"))]
    for trick in ("xp is not numpy", "xp is numpy", "map_chunks", "scratch", "chunk", "thread", "launch", "cuda"):
        assert trick not in text.lower(), f"{os.path.basename(path)} mentions {trick!r}"


def test_only_the_seam_reaches_the_engine():
    outside = [p for p in _files("", "nn", "models", "data") if not p.endswith("ops.py")]
    for path in outside:
        engine = [n for n in _imports(path) if n.startswith("kernels") or "cuda" in n]
        assert not engine, f"{os.path.relpath(path, PACKAGE)} imports {engine}"
        assert "launch" not in open(path).read(), os.path.relpath(path, PACKAGE)
    assert any(n.startswith("kernels") for n in _imports(os.path.join(PACKAGE, "ops.py")))
