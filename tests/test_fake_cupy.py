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


def _run(args, timeout=600, backend="numpy"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAKE), str(ROOT)]), MINIRES_BACKEND=backend)
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


@pytest.mark.slow  # ~20 s: the whole gpu-marked suite in a subprocess (CI runs -m slow)
def test_gpu_tests_pass_on_the_stand_in():
    """Every test marked ``gpu`` (the xp-parametrized suite on CuPy, the parity and kernel tests)."""
    result = _run(["-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # none skipped for want of CuPy (a student copy without docs/ skips tests/test_docs.py: fine)
    assert " passed" in result.stdout and "CuPy with a GPU is not available" not in result.stdout, \
        result.stdout[-1500:]


@needs_data
def test_training_cli_on_the_stand_in(tmp_path):
    """Data loading, training, evaluation, checkpoint and curves with --backend cupy."""
    result = _run(["-m", "minires", "train", "--backend", "cupy", "--model", "resnet20",
                   "--dataset", "fashion-mnist", "--subset", "32", "--batch-size", "16", "--epochs", "1",
                   "--no-progress", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "backend cupy" in result.stdout and "final: test accuracy" in result.stdout
    assert (tmp_path / "checkpoint.npz").is_file() and (tmp_path / "curves.png").is_file()
    # a checkpoint written on the GPU evaluates on either backend, to the same numbers
    lines = {}
    for backend in ("cupy", "numpy"):
        result = _run(["-m", "minires", "evaluate", "--checkpoint", str(tmp_path / "checkpoint.npz"),
                       "--backend", backend, "--subset", "32"])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        lines[backend] = result.stdout.strip().splitlines()[-1]
    assert "test accuracy" in lines["cupy"] and lines["cupy"] == lines["numpy"], lines


@pytest.mark.slow  # ~20 s of subprocess; training on the stand-in stays in the default run
@needs_data
def test_degradation_cli_on_the_stand_in(tmp_path):
    result = _run(["-m", "minires", "degradation", "--backend", "cupy", "--iterations", "4", "--batch", "8",
                   "--subset", "32", "--eval-every", "2", "--eval-size", "16", "--record-every", "2",
                   "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "resnet56: final train error" in result.stdout


@pytest.mark.slow  # ~14 s of subprocesses
def test_inspection_clis_on_the_stand_in(tmp_path):
    """gradcheck (selected by MINIRES_BACKEND, as docs/gpu.md shows), the demo and gradflow on CuPy."""
    result = _run(["-m", "minires", "gradcheck"], backend="cupy")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all backward passes agree" in result.stdout
    # 64x64 to be quick; tests/test_demo.py runs the full 224x224 (slow)
    result = _run([str(ROOT / "demos" / "seed_block.py"), "--size", "64"], backend="cupy")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "backend:      cupy" in result.stdout and "(1, 64, 64, 64)" in result.stdout
    assert "gradient check: PASS" in result.stdout
    result = _run(["-m", "minires", "gradflow", "--backend", "cupy", "--depths", "20", "--batch", "8",
                   "--synthetic", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "gradflow.json").is_file() and (tmp_path / "gradflow.png").is_file()


@pytest.mark.engine  # the engine's one-transfer gradient check; the textbook's checks array by array
def test_a_training_step_syncs_with_the_host_three_times():
    """On a GPU every device -> host transfer waits for all queued kernels, so a step
    must not make one per parameter. The three it needs: the labels' range check
    (min and max together), the loss (a Python float) and the gradient check
    (one transfer for all gradients)."""
    code = (
        "import numpy, cupy\n"
        "from minires import backend, nn\n"
        "from minires.data import DataLoader\n"
        "from minires.models import build_model\n"
        "from minires.optim import SGD\n"
        "from minires.train import train_one_epoch\n"
        "backend.set_backend('cupy'); backend.manual_seed(0)\n"
        "rng = numpy.random.default_rng(0)\n"
        "images = rng.integers(0, 256, (12, 1, 8, 8), dtype=numpy.uint8)\n"
        "loader = DataLoader(images, rng.integers(0, 10, 12), 4, mean=[0.5], std=[0.25])\n"
        "model = build_model('resnet20', in_channels=1)\n"
        "opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)\n"
        "before = cupy.host_transfers\n"
        "train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, None, 1, progress=False)\n"
        "print(cupy.host_transfers - before)\n"
    )
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    steps = 3
    transfers = int(result.stdout.split()[-1])
    assert transfers == 3 * steps + 1, f"{transfers} device->host transfers in {steps} steps"  # +1: the epoch's accuracy


@pytest.mark.engine  # a budget of the engine's kernels, not a property of the math
@pytest.mark.skipif(bool(__import__("minires.ops").ops.TEXTBOOK_ONLY),
                    reason="a launch budget of the engine: this student copy runs the textbook for its parts")
def test_device_operations_of_a_training_step():
    """A GPU step is launch-bound (docs/gpu.md): its speed follows the number of
    kernel launches, which the stand-in counts. Gradients are zeroed, checked for
    NaN/inf and stepped by SGD in one launch each for all parameters (the check
    also zeroes its flag), and the whole ResNet-20 step (as the training loop
    runs it: no gradient of the images) stays under a budget, so
    that a change adding launches is noticed (the count does not depend on the
    batch size)."""
    code = (
        "import numpy, cupy\n"
        "from minires import backend, nn\n"
        "from minires.models import build_model\n"
        "from minires.optim import SGD\n"
        "from minires.train import first_nonfinite_grad\n"
        "backend.set_backend('cupy'); backend.manual_seed(0)\n"
        "rng = numpy.random.default_rng(0)\n"
        "x = cupy.asarray(rng.standard_normal((4, 3, 8, 8)).astype(numpy.float32))\n"
        "y = cupy.asarray(rng.integers(0, 10, 4))\n"
        "model, loss_fn = build_model('resnet20'), nn.CrossEntropyLoss()\n"
        "opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)\n"
        "def step():\n"
        "    ops = {}\n"
        "    def phase(name, f):\n"
        "        before = cupy.device_ops; result = f(); ops[name] = cupy.device_ops - before\n"
        "        return result\n"
        "    logits = phase('forward', lambda: model(x))\n"
        "    phase('loss', lambda: loss_fn(logits, y))\n"
        "    phase('zero_grad', opt.zero_grad)\n"
        "    phase('backward', lambda: model.backward(loss_fn.backward(), input_grad=False))\n"
        "    phase('check', lambda: first_nonfinite_grad(model))\n"
        "    phase('optimizer', opt.step)\n"
        "    return ops\n"
        "step()\n"  # the first step also uploads the address tables and creates the velocities
        "print(step())\n"
    )
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    ops = eval(result.stdout.strip().splitlines()[-1])
    assert (ops["zero_grad"], ops["check"], ops["optimizer"]) == (1, 2, 1), ops
    # 614 before the one-launch kernels, 385 with them, 383 without the images' gradient,
    # 364 with BatchNorm's statistics and their finishing in one launch
    assert sum(ops.values()) <= 364, ops
