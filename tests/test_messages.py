"""Error messages a newcomer meets: they name the layer, and give advice that fits."""
import sys
import types

import numpy
import pytest

from minires import backend, models, nn


def test_second_backward_names_the_layer_path():
    backend.manual_seed(0)
    net = models.resnet20(in_channels=1)
    out = net(numpy.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(numpy.float32))
    dout = numpy.random.default_rng(1).standard_normal(out.shape).astype(numpy.float32)
    net.backward(dout)
    with pytest.raises(RuntimeError, match=r"^fc: Linear\.backward called without a matching forward"):
        net.backward(dout)


def test_backward_before_forward_names_a_nested_layer():
    backend.manual_seed(0)
    net = nn.Sequential(models.blocks.BasicBlock(4, 8, stride=2), nn.ReLU())
    net(numpy.ones((1, 4, 4, 4), numpy.float32))
    net[1].backward(numpy.ones((1, 8, 2, 2), numpy.float32))  # uses the ReLU's cache by hand
    with pytest.raises(RuntimeError, match=r"^1: ReLU\.backward called without"):
        net.backward(numpy.ones((1, 8, 2, 2), numpy.float32))
    with pytest.raises(RuntimeError, match=r"^ReLU\.backward called without"):  # a layer on its own: no path
        net[1].backward(numpy.ones((1, 8, 2, 2), numpy.float32))


class _NoDriver(Exception):
    pass


def _fake_cupy(device_count):
    def count():
        if device_count is None:
            raise _NoDriver("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return device_count
    runtime = types.SimpleNamespace(getDeviceCount=count, CUDARuntimeError=_NoDriver)
    return types.SimpleNamespace(__version__="13.0.0", cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("device_count, start", [(None, "CuPy cannot use a GPU (cudaErrorInsufficientDriver"),
                                                 (0, "CuPy found no GPU")])
def test_cupy_without_a_driver_gets_gpu_advice_not_install_advice(monkeypatch, device_count, start):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count))
    with pytest.raises(RuntimeError) as info:
        backend.set_backend("cupy")
    message = str(info.value)
    assert message.startswith(start) and "CuPy 13.0.0 is installed" in message
    assert "nvidia-smi" in message and "pip install" not in message
    assert backend.backend_name() == "numpy"


def test_cupy_missing_gets_install_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(RuntimeError, match=r"CuPy is not installed: .*pip install -e \.\[cuda\]"):
        backend.set_backend("cupy")
