"""The CuPy code paths, run in CI on a strict CuPy stand-in (tests/fake_cupy).

CI has no GPU, so the tests marked ``gpu`` skip there. Here they run in a
subprocess where ``import cupy`` gives the stand-in: NumPy underneath, but a
device array never turns into a NumPy array implicitly and a NumPy array
never enters a device call, and the CUDA kernels run through the CPU emulator.
That catches host/device mixing, a forgotten ``to_numpy``, a kernel argument
of the wrong C type, in every change, without a GPU. Speed and CuPy's exact
API are left to a real GPU (``pytest -m gpu``, .ci/gpu-check).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_emulator
from test_train import needs_data

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_cupy"

pytestmark = pytest.mark.skipif(not cuda_emulator.compiler_available(),
                                reason="g++ is needed to emulate the CUDA kernels")


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAKE), str(ROOT)]), MINIRES_BACKEND="numpy")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_stand_in_is_strict():
    code = (
        "import numpy, cupy, pytest\n"
        "a = cupy.asarray(numpy.ones(3))\n"
        "with pytest.raises(TypeError, match='Implicit conversion'): numpy.asarray(a)\n"
        "with pytest.raises(TypeError, match='NumPy array'): a + numpy.ones(3)\n"
        "with pytest.raises(TypeError, match='NumPy array'): a[:] = numpy.ones(3)\n"
        "assert isinstance(a.sum(), cupy.ndarray) and float(a.sum()) == 3.0\n"
        "assert isinstance(a * 2.0, cupy.ndarray) and (a.get() == 1).all()\n"
    )
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr


def test_gpu_tests_pass_on_the_stand_in():
    """Every test marked ``gpu`` (the xp-parametrized suite on CuPy, the parity and kernel tests)."""
    result = _run(["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-500:]


@needs_data
def test_training_cli_on_the_stand_in(tmp_path):
    """Data loading, training, evaluation, checkpoint and curves with --backend cupy."""
    result = _run(["-m", "minires", "train", "--backend", "cupy", "--model", "resnet20",
                   "--dataset", "fashion-mnist", "--subset", "32", "--batch-size", "16", "--epochs", "1",
                   "--no-progress", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "backend cupy" in result.stdout and "final: test accuracy" in result.stdout
    assert (tmp_path / "checkpoint.npz").is_file() and (tmp_path / "curves.png").is_file()
