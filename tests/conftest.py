"""Shared fixtures, and a guard that the tests import this repository's minires.

``xp`` runs a test once per backend: NumPy always, CuPy only where CuPy and a
GPU are present (skipped cleanly elsewhere, e.g. in CI). The active backend is
switched for the duration of the test, so modules built inside it live there.
"""
from pathlib import Path

import numpy
import pytest

try:
    import minires
except ModuleNotFoundError as err:  # no minires importable at all: pytest_configure explains
    if err.name != "minires":
        raise
    minires = None

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Stop at once if these tests would import some other folder's ``minires``.

    Plain ``pytest`` (unlike ``python -m pytest``) does not put the repository on
    sys.path, so it imports whichever ``minires`` is installed: in a student copy
    of the course kit that is the course's reference code, and every test of a
    stubbed part would pass. A UsageError prints one clear message, no traceback.
    """
    imported = Path(minires.__file__).resolve().parent if minires else None
    here = (REPO / "minires").resolve()
    if imported != here:  # (checked before importing anything from it: another minires may lack it)
        problem = (f"import minires from {imported}, not {here}: they would test that code"
                   if imported else f"cannot import minires ({REPO} is not on sys.path)")
        raise pytest.UsageError(
            f"the tests in {REPO / 'tests'} {problem}.\n"
            f"  fix: run `pip install -e .` in {REPO}, or run the tests with `python -m pytest` there.")


BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    from minires import backend  # here, not at the top: pytest_configure checks which minires first
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
