"""Shared fixtures.

``xp`` runs a test once per backend: NumPy always, CuPy only where CuPy and a
GPU are present (skipped cleanly elsewhere, e.g. in CI). The active backend is
switched for the duration of the test, so modules built inside it live there.
"""
import numpy
import pytest

from minires import backend

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    if request.param == "cupy" and not backend.cupy_available():
        pytest.skip("CuPy with a GPU is not available")
    previous = backend.backend_name()
    module = backend.set_backend(request.param)
    backend.manual_seed(0)
    yield module
    backend.set_backend(previous)


@pytest.fixture
def rng():
    return numpy.random.default_rng(1234)
