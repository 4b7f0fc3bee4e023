"""NumPy vs CuPy: the same weights and the same batch give the same numbers.

A whole training step of small ResNets (both shortcut options, a plain net)
runs once on NumPy and once on CuPy: outputs, loss, every parameter gradient,
the input gradient and the BatchNorm running statistics must agree, to float32
rounding in float32 and to 1e-10 in float64. These run only where CuPy sees a
GPU (marked ``gpu``; CI skips them).
"""
import numpy
import pytest

from minires import backend
from minires.gradcheck import rel_error
from minires.models.resnet import CifarResNet
from minires.nn import CrossEntropyLoss

pytestmark = pytest.mark.gpu

TOLERANCE = {numpy.float32: 2e-4, numpy.float64: 1e-10}


@pytest.fixture
def cupy():
    if not backend.cupy_available():
        pytest.skip("CuPy with a GPU is not available")
    import cupy
    previous = backend.backend_name()
    yield cupy
    backend.set_backend(previous)


def _one_step(kw, which, dtype, state, x, y):
    """Forward + backward of a fresh ResNet-8 on backend ``which``; everything back as NumPy."""
    backend.set_backend(which)
    model = CifarResNet(1, **kw).astype(dtype)
    model.load_state_dict(state)
    model.train()
    loss_fn = CrossEntropyLoss()
    logits = model(backend.to_device(x))
    loss = loss_fn(logits, backend.to_device(y))
    model.zero_grad()
    dx = model.backward(loss_fn.backward())
    results = {"logits": logits, "loss": backend.to_device(numpy.asarray(float(loss))), "dx": dx}
    results.update({"grad " + k: g for k, g in model.named_grads().items()})
    results.update({"buffer " + k: b for k, b in model.named_buffers().items()})
    return {k: backend.to_numpy(v) for k, v in results.items()}


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("kw", [{"shortcut": "A"}, {"shortcut": "B"}, {"plain": True}],
                         ids=["resnet8-A", "resnet8-B", "plain8"])
def test_training_step_is_the_same_on_numpy_and_cupy(cupy, kw, dtype):
    backend.set_backend("numpy")
    backend.manual_seed(0)
    state = CifarResNet(1, **kw).astype(dtype).state_dict()
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((8, 3, 16, 16)).astype(dtype)
    y = rng.integers(0, 10, 8)
    on_cpu = _one_step(kw, "numpy", dtype, state, x, y)
    on_gpu = _one_step(kw, "cupy", dtype, state, x, y)
    assert on_cpu.keys() == on_gpu.keys()
    worst = max((rel_error(on_gpu[k], on_cpu[k]), k) for k in on_cpu)
    print(f"ResNet-8 {kw} {numpy.dtype(dtype).name}: worst relative error {worst[0]:.1e} ({worst[1]})")
    for key in on_cpu:
        assert on_gpu[key].dtype == on_cpu[key].dtype, key
        assert rel_error(on_gpu[key], on_cpu[key]) < TOLERANCE[dtype], key
