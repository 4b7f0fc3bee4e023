"""Reliability (issue 9): bad input gets a clear error, nothing is lost, runs
are reproducible.

Complements the error tests in test_nn / test_ops / test_conv / test_pooling /
test_data / test_train (not repeated here):

1. shapes and types: every module's input, constructor arguments, dout of
   backward, backward without forward, NumPy/CuPy mixing, errors named by layer;
2. checkpoints: truncation, corruption, versions, other architectures, keys,
   shapes, and a writer killed with SIGKILL mid-write;
3. data files: what test_data leaves out (wrong image size, labels out of range);
4. numerics: NaN/inf located during training, softmax-CE at +-1e4 in float32;
5. determinism: same seed, bit-identical training steps;
7. the CLI end to end in a subprocess: one-line errors, exit 2, no traceback.
(6, the property tests, are in test_properties.py.)
"""
import gzip
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time

import numpy
import pytest

from minires import backend, models, nn
from minires.checkpoint import CheckpointError, check_model_config, load_checkpoint, save_checkpoint
from minires.cli import main
from minires.data import DataError, DataLoader, load_dataset
from minires.functional.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from minires.optim import SGD
from minires.train import NonFiniteError, first_nonfinite_grad, load_model, train_one_epoch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f32 = numpy.float32


def zeros(*shape, dtype=f32):
    return numpy.zeros(shape, dtype)


# ---------------------------------------------------------------------------
# 1. shapes and types
# ---------------------------------------------------------------------------
# (module factory, bad input, error type, what the message must say). Each
# message names the module (its repr) and the expected and the actual input.
BAD_INPUTS = [
    ("conv 2x2 image, 3x3 kernel, no padding", lambda: nn.Conv2d(1, 2, 3), zeros(1, 1, 2, 2), ValueError,
     r"^Conv2d\(1, 2, kernel_size=\(3, 3\).*expected an input of at least 3x3 pixels "
     r"\(kernel 3x3, padding 0x0\), got shape \(1, 1, 2, 2\)"),
    ("conv 1x4 image, 3x3 kernel, padding (0, 1)", lambda: nn.Conv2d(1, 2, 3, padding=(0, 1)), zeros(1, 1, 1, 4),
     ValueError, r"^Conv2d.*at least 3x1 pixels \(kernel 3x3, padding 0x1\), got shape \(1, 1, 1, 4\)"),
    ("conv uint8 pixels", lambda: nn.Conv2d(1, 2, 3), zeros(1, 1, 5, 5, dtype=numpy.uint8), ValueError,
     r"^Conv2d.*expected a floating-point input, got uint8"),
    ("conv a list", lambda: nn.Conv2d(1, 2, 1), [[[[1.0]]]], TypeError, r"^Conv2d.*expected an array, got list"),
    ("maxpool 2x2 on a 1x1 image", lambda: nn.MaxPool2d(2), zeros(1, 3, 1, 1), ValueError,
     r"^MaxPool2d\(kernel_size=2.*at least 2x2 pixels.*got shape \(1, 3, 1, 1\)"),
    ("avgpool 3x3 on 2x2", lambda: nn.AvgPool2d(3), zeros(1, 3, 2, 2), ValueError,
     r"^AvgPool2d\(kernel_size=3.*at least 3x3 pixels.*got shape \(1, 3, 2, 2\)"),
    ("maxpool rank 3", lambda: nn.MaxPool2d(2), zeros(3, 4, 4), ValueError,
     r"^MaxPool2d.*expected input of shape \(\*, \*, \*, \*\), got \(3, 4, 4\)"),
    ("avgpool int32", lambda: nn.AvgPool2d(2), zeros(1, 1, 4, 4, dtype=numpy.int32), ValueError,
     r"^AvgPool2d.*floating-point input, got int32"),
    ("global pool rank 2", lambda: nn.AdaptiveAvgPool2d(1), zeros(2, 4), ValueError,
     r"^AdaptiveAvgPool2d.*\(\*, \*, \*, \*\), got \(2, 4\)"),
    ("global pool int8", lambda: nn.AdaptiveAvgPool2d(1), zeros(1, 4, 2, 2, dtype=numpy.int8), ValueError,
     r"^AdaptiveAvgPool2d.*floating-point input, got int8"),
    ("batchnorm rank 2", lambda: nn.BatchNorm2d(2), zeros(2, 2), ValueError,
     r"^BatchNorm2d\(2.*\(\*, 2, \*, \*\), got \(2, 2\)"),
    ("batchnorm float16", lambda: nn.BatchNorm2d(2), zeros(2, 2, 2, 2, dtype=numpy.float16), ValueError,
     r"^BatchNorm2d.*expected float32 input \(the module's dtype\), got float16"),
    ("linear rank 4", lambda: nn.Linear(4, 2), zeros(1, 4, 1, 1), ValueError,
     r"^Linear\(in_features=4.*\(\*, 4\), got \(1, 4, 1, 1\)"),
    ("linear int64", lambda: nn.Linear(4, 2), zeros(1, 4, dtype=numpy.int64), ValueError,
     r"^Linear.*floating-point input, got int64"),
    ("relu a list", nn.ReLU, [1.0, -1.0], TypeError, r"^ReLU\(\): expected an array, got list"),
    ("relu int64", nn.ReLU, numpy.array([1, -1]), ValueError, r"^ReLU\(\): expected a floating-point input, got int64"),
    ("flatten rank 1", nn.Flatten, zeros(3), ValueError, r"^Flatten\(\): expected input of shape \(\*, \*\), got \(3,\)"),
]


@pytest.mark.parametrize("factory, x, error, message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_module_rejects_bad_input(factory, x, error, message):
    module = factory()
    with pytest.raises(error, match=message):
        module(x)
    assert module.cache is None  # nothing half-done is left for a backward to use


def test_cross_entropy_rejects_bad_input():
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"^CrossEntropyLoss\(\): expected input of shape \(\*, \*\), got \(3,\)"):
        loss_fn(zeros(3), numpy.array([0]))
    with pytest.raises(TypeError, match="expected labels as an integer array, got list"):
        loss_fn(zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss_fn(zeros(2, 3), numpy.array([0, -1]))


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Conv2d(1, 2, 0), r"^Conv2d: kernel_size must be an integer >= 1, got 0"),
    (lambda: nn.Conv2d(0, 2, 3), r"^Conv2d: in_channels must be an integer >= 1, got 0"),
    (lambda: nn.Conv2d(1, 2, (3, 0)), r"kernel_size must be a pair of integers >= 1, got \(3, 0\)"),
    (lambda: nn.Conv2d(1, 2, 3, stride=0), r"stride must be an integer >= 1, got 0"),
    (lambda: nn.Conv2d(1, 2, 3, padding=-1), r"padding must be an integer >= 0, got -1"),
    (lambda: nn.Conv2d(1, 2.5, 3), r"out_channels must be an integer >= 1, got 2\.5"),
    (lambda: nn.Linear(0, 2), r"^Linear: in_features must be an integer >= 1, got 0"),
    (lambda: nn.BatchNorm2d(0), r"^BatchNorm2d: num_features must be an integer >= 1, got 0"),
    (lambda: nn.MaxPool2d(2, stride=0), r"^MaxPool2d: stride must be an integer >= 1, got 0"),
    (lambda: nn.AvgPool2d(0), r"^AvgPool2d: kernel_size must be an integer >= 1, got 0"),
    (lambda: nn.AvgPool2d(2, padding=-1), r"^AvgPool2d: padding must be an integer >= 0, got -1"),
    (lambda: nn.MaxPool2d(2, padding=2), r"^MaxPool2d: padding 2 must be at most half the kernel size 2"),
    (lambda: nn.MaxPool2d((3, 2), padding=(1, 2)), r"padding \(1, 2\) must be at most half the kernel size \(3, 2\)"),
])
def test_constructor_arguments_are_checked(make, message):
    # Before: ZeroDivisionError from the initializer, or a BatchNorm2d(0) that "worked".
    with pytest.raises(ValueError, match=message):
        make()


def _forward(module, shape, rng):
    return module(rng.standard_normal(shape).astype(f32))


@pytest.mark.parametrize("factory, x_shape, bad_dout_shape", [
    (nn.ReLU, (3, 4), (1, 4)),                              # would broadcast to (3, 4)
    (lambda: nn.BatchNorm2d(2), (2, 2, 3, 3), (1, 2, 3, 3)),  # would broadcast
    (lambda: nn.Linear(4, 2), (3, 4), (1, 2)),              # would give dx of shape (1, 4)
    (nn.Flatten, (2, 3, 2, 2), (4, 6)),                     # same size: reshape would scramble it
    (lambda: nn.Conv2d(1, 2, 3), (1, 1, 5, 5), (1, 2, 4, 4)),
    (lambda: nn.MaxPool2d(2), (1, 1, 4, 4), (1, 1, 3, 3)),
])
def test_backward_rejects_dout_of_the_wrong_shape(factory, x_shape, bad_dout_shape, rng):
    module = factory()
    out = _forward(module, x_shape, rng)
    message = re.escape(f"expected dout of shape {out.shape}") + ".*got (shape )?" + re.escape(str(bad_dout_shape))
    with pytest.raises(ValueError, match=message):
        module.backward(zeros(*bad_dout_shape))


@pytest.mark.parametrize("factory, x_shape", [
    (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 4, 4)),
    (lambda: nn.BatchNorm2d(2), (2, 2, 3, 3)),
    (lambda: nn.Linear(4, 2), (3, 4)),
    (nn.Flatten, (2, 3, 2, 2)),
    (lambda: nn.MaxPool2d(2), (1, 2, 4, 4)),
    (lambda: nn.AvgPool2d(3, 2, 1), (1, 2, 5, 5)),
    (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 2, 2)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (2, 1, 4, 4)),
    (lambda: models.CifarResNet(1, num_classes=3, in_channels=1, widths=(2, 3, 4)), (2, 1, 6, 6)),
])
def test_backward_before_forward_and_twice_raise(factory, x_shape, rng):
    module = factory()
    with pytest.raises(RuntimeError, match=r"backward called without a matching forward \(call forward first"):
        module.backward(zeros(1))
    out = _forward(module, x_shape, rng)
    module.backward(rng.standard_normal(out.shape).astype(f32))  # the one allowed backward
    with pytest.raises(RuntimeError, match="each forward allows one backward"):
        module.backward(rng.standard_normal(out.shape).astype(f32))


def test_cross_entropy_backward_before_forward_and_twice():
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="CrossEntropyLoss.backward called without a matching forward"):
        loss_fn.backward()
    loss_fn(zeros(2, 3), numpy.array([0, 1]))
    loss_fn.backward()
    with pytest.raises(RuntimeError, match="CrossEntropyLoss.backward called without a matching forward"):
        loss_fn.backward()


def test_model_errors_name_the_layer():
    """A model's error says which layer (dotted name) refused the input."""
    model = models.resnet20(in_channels=1)
    with pytest.raises(ValueError, match=r"^conv1: Conv2d\(1, 16, .*expected input of shape "
                                         r"\(\*, 1, \*, \*\), got \(2, 3, 8, 8\)$"):
        model(zeros(2, 3, 8, 8))  # an RGB batch into a grayscale model
    with pytest.raises(ValueError, match=r"^conv1: .*expected float32 input .*got float64"):
        model(numpy.zeros((2, 1, 8, 8)))
    # deep inside: batch of 1 reaches a 1x1 feature map, where training-mode BN has one value
    resnet18 = models.build_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"^layer4\.0\.bn1: batchnorm2d: training needs more than one value"):
        resnet18(zeros(1, 3, 32, 32))
    # A layer called on its own adds no prefix, and calling it again does not stack prefixes.
    with pytest.raises(ValueError, match=r"^Conv2d\(1, 16"):
        model.conv1(zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^conv1: Conv2d"):
        model(zeros(2, 3, 8, 8))


class ndarray:
    """Stands in for cupy.ndarray (CuPy is not installed here): the backend
    recognizes CuPy arrays by their class's module."""
    __module__ = "cupy"

    def __init__(self, shape, dtype=f32):
        self.shape, self.dtype, self.ndim = shape, numpy.dtype(dtype), len(shape)


def test_numpy_cupy_mixing_is_a_type_error():
    host = numpy.zeros((2, 3), f32)
    device = ndarray((4, 3))
    with pytest.raises(TypeError) as info:
        backend.get_array_module(host, device)
    message = str(info.value)
    assert "NumPy and CuPy arrays mixed" in message
    assert "numpy.ndarray(2, 3)" in message and "cupy.ndarray(4, 3)" in message  # which is which
    assert "to_device(a)" in message and "to_numpy(a)" in message                # how to convert
    # None and Python numbers never count as arrays
    assert backend.get_array_module(host, None, 2.0) is numpy
    # through a layer: NumPy weights, a "CuPy" input (named by the model's layer)
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"^0: NumPy and CuPy arrays mixed .*cupy\.ndarray\(4, 3\)"):
        model(device)
    with pytest.raises(TypeError, match=r"NumPy and CuPy arrays mixed .*cupy\.ndarray\(1, 1, 5, 5\)"):
        nn.Conv2d(1, 2, 3)(ndarray((1, 1, 5, 5)))


# ---------------------------------------------------------------------------
# 2. checkpoints
# ---------------------------------------------------------------------------
def tiny_model(**kw):
    return models.CifarResNet(1, num_classes=3, in_channels=1, widths=(2, 3, 4), **kw)


def test_checkpoint_version_and_metadata_are_checked(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"w": numpy.zeros(2)}, meta={"format_version": 99})
    with pytest.raises(CheckpointError, match=r"c\.npz' has format version 99; this minires reads version 1"):
        load_checkpoint(path)
    for meta, shown in (('"not a dict"', "'not a dict'"), ("[1, 2]", r"\[1, 2\]"), ("7", "7")):
        numpy.savez(path, __meta__=numpy.array(meta))
        with pytest.raises(CheckpointError, match=f"has metadata {shown}, expected a JSON object"):
            load_checkpoint(path)
    numpy.savez(path, __meta__=numpy.array("{not json"))
    with pytest.raises(CheckpointError, match="unreadable metadata"):
        load_checkpoint(path)
    numpy.save(str(tmp_path / "array.npy"), numpy.zeros(3))
    with pytest.raises(CheckpointError, match=r"array\.npy' is a single \.npy array, not a minires \.npz"):
        load_checkpoint(str(tmp_path / "array.npy"))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(str(tmp_path))  # a directory


def test_checkpoint_for_another_architecture(tmp_path):
    path = str(tmp_path / "resnet20.npz")
    backend.manual_seed(0)
    config = {"name": "resnet20", "num_classes": 10, "in_channels": 1, "shortcut": "A"}
    save_checkpoint(path, models.resnet20(in_channels=1).state_dict(), meta={"model": config})
    state, _, meta = load_checkpoint(path)
    check_model_config(path, meta, config)  # the same model: fine
    for other in ({**config, "name": "resnet32"}, {**config, "in_channels": 3}, {**config, "shortcut": "B"}):
        with pytest.raises(CheckpointError, match=r"resnet20\.npz' is for model \{.*'name': 'resnet20'.*\}, not"):
            check_model_config(path, meta, other)
    # Without the config check, load_state_dict still refuses, naming keys or shapes:
    with pytest.raises(KeyError, match=r"missing keys \['layer1\.3\.bn1\.bias'.*\] and \d+ more, "
                                       r"unexpected keys \[\] \(a checkpoint of another model\?\)"):
        models.resnet32(in_channels=1).load_state_dict(state)
    with pytest.raises(KeyError, match=r"unexpected keys \[\].*|missing keys \['layer2\.0\.downsample"):
        models.resnet20(in_channels=1, shortcut="B").load_state_dict(state)
    with pytest.raises(ValueError, match=r"'conv1\.weight' has shape \(16, 1, 3, 3\), expected \(16, 3, 3, 3\)"):
        models.resnet20(in_channels=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(10, 64\), expected \(100, 64\)"):
        models.resnet20(num_classes=100, in_channels=1).load_state_dict(state)


@pytest.mark.parametrize("edit, error, message", [
    (lambda s: s.pop("conv1.weight"), KeyError, r"missing keys \['conv1\.weight'\], unexpected keys \[\]"),
    (lambda s: s.update(extra=numpy.zeros(1)), KeyError, r"missing keys \[\], unexpected keys \['extra'\]"),
    (lambda s: s.update({"fc.bias": numpy.zeros(4, f32)}), ValueError, r"'fc\.bias' has shape \(4,\), expected \(3,\)"),
    (lambda s: s.update({"fc.bias": numpy.array(["a", "b", "c"])}), ValueError, r"'fc\.bias' holds <U1 values"),
])
def test_checkpoint_keys_and_shapes_are_checked_and_nothing_changes(tmp_path, edit, error, message):
    backend.manual_seed(0)
    state = tiny_model().state_dict()
    edit(state)
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, state, meta={"model": {"name": "tiny"}})
    loaded, _, _ = load_checkpoint(path)
    backend.manual_seed(1)
    model = tiny_model()
    before = model.state_dict()
    with pytest.raises(error, match=message):
        model.load_state_dict(loaded)
    after = model.state_dict()
    assert all(numpy.array_equal(before[k], after[k]) for k in before)  # all or nothing


def test_load_model_refuses_checkpoints_that_do_not_fit(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"w": numpy.zeros(2)}, meta={})
    with pytest.raises(CheckpointError, match="does not say which model it holds"):
        load_model(path)
    save_checkpoint(path, {"w": numpy.zeros(2)}, meta={"model": {"name": "resnet99"}})
    with pytest.raises(ValueError, match="unknown model 'resnet99'"):
        load_model(path)
    save_checkpoint(path, {"w": numpy.zeros(2)}, meta={"model": {"name": "resnet20", "in_channels": 1}})
    with pytest.raises(KeyError, match=r"missing keys \['bn1\.bias'.* and \d+ more, unexpected keys \['w'\]"):
        load_model(path)


@pytest.mark.parametrize("keep", [0, 1, 22, 100, 0.25, 0.5, 0.9, -1])
def test_truncated_checkpoint(tmp_path, keep):
    path = tmp_path / "c.npz"
    save_checkpoint(str(path), tiny_model().state_dict(), meta={"model": {"name": "tiny"}})
    data = path.read_bytes()
    cut = keep if isinstance(keep, int) and keep >= 0 else int(len(data) * keep) if keep > 0 else len(data) - 1
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"c\.npz' is truncated or corrupted"):
        load_checkpoint(str(path))


def test_entry_lost_from_the_zip_directory_is_detected(tmp_path):
    """The zip directory has no checksum: one flipped bit in a comment-length
    field hides the entries after it. The metadata (checksummed) lists them."""
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, tiny_model().state_dict(), meta={"epoch": 1})
    with numpy.load(path) as archive:
        kept = {k: archive[k] for k in archive.files if k != "model/fc.bias"}
    numpy.savez(path, **kept)  # what a reader sees when the directory loses an entry
    with pytest.raises(CheckpointError, match=r"truncated or corrupted \(entries missing: \['model/fc\.bias'\], "
                                              r"unexpected: \[\]\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("compressed", [False, True], ids=["as_saved", "savez_compressed"])
def test_corruption_is_detected_or_harmless(tmp_path, compressed):
    """Flip one bit at 150 random places: each load either raises CheckpointError
    or returns exactly the saved content (a flip in a field zip does not check,
    e.g. a timestamp) -- never a silently wrong checkpoint. Also for a
    checkpoint someone recompressed (corrupt deflate data raises zlib.error).
    (An exhaustive run, every bit of a 21 kB checkpoint, found 0 wrong loads.)"""
    path = tmp_path / "c.npz"
    backend.manual_seed(0)
    state = tiny_model().state_dict()
    save_checkpoint(str(path), state, {"step": numpy.int64(7)}, meta={"epoch": 3})
    if compressed:
        with numpy.load(str(path)) as archive:
            numpy.savez_compressed(str(path), **{k: archive[k] for k in archive.files})
    data = path.read_bytes()
    picker = random.Random(0)
    detected = 0
    for position in picker.sample(range(len(data)), 150):
        flipped = bytearray(data)
        flipped[position] ^= 1 << picker.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            loaded, optim, meta = load_checkpoint(str(path))
        except CheckpointError:
            detected += 1
            continue
        assert meta["epoch"] == 3 and int(optim["step"]) == 7, position
        assert loaded.keys() == state.keys(), position
        for k in state:
            assert loaded[k].dtype == state[k].dtype and numpy.array_equal(loaded[k], state[k]), (position, k)
    assert detected > 100  # nearly every byte is array data, covered by CRC-32 (and deflate)


WRITER = """
import sys, numpy
from minires.checkpoint import save_checkpoint
path, size = sys.argv[1], int(sys.argv[2])
for i in range(1, 1000000):
    save_checkpoint(path, {"w": numpy.full(size, i, numpy.float32), "b": numpy.full(7, -i)}, meta={"i": i})
"""


def _temp_files(folder):
    return [e.path for e in os.scandir(folder) if e.name.startswith(".checkpoint-") and e.name.endswith(".tmp")]


def _writing(folder):
    """True while a temporary checkpoint file holds some bytes (a write is under way)."""
    for path in _temp_files(folder):
        try:
            if os.path.getsize(path) > 0:
                return True
        except FileNotFoundError:  # renamed in the meantime
            pass
    return False


def _assert_complete(path, size):
    state, _, meta = load_checkpoint(path)
    i = meta["i"]
    assert state["w"].shape == (size,) and numpy.all(state["w"] == i)
    assert numpy.array_equal(state["b"], numpy.full(7, -i))
    return i


def test_killed_writer_leaves_the_previous_checkpoint_intact(tmp_path):
    """A process saving a 16 MB checkpoint over and over is killed with SIGKILL
    while a temporary file is being written (and, in the last rounds, at a
    random moment): the checkpoint always loads complete and consistent. The
    killed writer's temp file is left behind; it is never at ``path``."""
    size = 4 << 20  # float32: 16 MiB per save, so a write takes a while
    path = str(tmp_path / "checkpoint.npz")
    save_checkpoint(path, {"w": numpy.full(size, 0, numpy.float32), "b": numpy.full(7, 0)}, meta={"i": 0})
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    picker = random.Random(1)
    partial, last = 0, 0
    for round_ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(size)], env=env)
        try:
            deadline = time.monotonic() + 30
            while not _writing(tmp_path):
                assert writer.poll() is None and time.monotonic() < deadline, "writer never started writing"
                time.sleep(0.0005)
            if round_ >= 3:
                time.sleep(picker.uniform(0, 0.3))  # somewhere between, or during, the next writes
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait()
        assert writer.returncode == -signal.SIGKILL
        i = _assert_complete(path, size)  # intact, whatever moment the kill hit
        assert i >= last
        last = i
        for leftover in _temp_files(tmp_path):
            try:  # killed while writing (usually), or between the last byte and the rename
                assert _assert_complete(leftover, size) >= i
            except CheckpointError as err:
                assert "truncated or corrupted" in str(err)
                partial += 1
            os.remove(leftover)  # the only trace a killed writer leaves; save_checkpoint never reuses it
        if partial >= 3 and round_ >= 3:
            break
    assert partial >= 2  # the kills really did cut writes in half (a plain write would be broken now)
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


def test_failed_save_leaves_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"w": numpy.arange(3.0)}, meta={"epoch": 1})
    before = open(path, "rb").read()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(numpy, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"w": numpy.arange(4.0)}, meta={"epoch": 2})
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["c.npz"]


# ---------------------------------------------------------------------------
# 3. data files (test_data.py covers truncation, corruption, magic numbers,
#    image/label count mismatches, checksums and downloads)
# ---------------------------------------------------------------------------
def write_idx(path, array):
    array = numpy.asarray(array, numpy.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def fake_fashion_mnist(folder, image_hw=(28, 28), labels=None):
    folder.mkdir(exist_ok=True)
    rng = numpy.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n,) + image_hw))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n) if labels is None else labels[:n])
    return folder


@pytest.fixture
def no_data_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_dataset_with_the_wrong_image_size_is_refused(tmp_path, no_data_env):
    folder = fake_fashion_mnist(tmp_path / "d", image_hw=(32, 32))
    x_train, *_ = load_dataset("fashion-mnist", str(fake_fashion_mnist(tmp_path / "ok")), download=False,
                               verify=False, progress=False)
    assert x_train.shape == (6, 1, 28, 28)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: fashion-mnist train images must be "
                                        r"uint8 \(6, 1, 28, 28\), found uint8 \(6, 1, 32, 32\)"):
        load_dataset("fashion-mnist", str(folder), download=False, verify=False, progress=False)


def test_dataset_with_labels_out_of_range_is_refused(tmp_path, no_data_env):
    folder = fake_fashion_mnist(tmp_path / "d", labels=numpy.array([0, 1, 2, 12, 4, 5]))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: fashion-mnist labels must be in 0\.\.9, "
                                        r"found 0\.\.12"):
        load_dataset("fashion-mnist", str(folder), download=False, verify=False, progress=False)


def test_dataset_checksums_are_verified_by_default(tmp_path, no_data_env):
    folder = fake_fashion_mnist(tmp_path / "d")  # right format, but not the official files
    with pytest.raises(DataError, match=r"idx[13]-ubyte\.gz: SHA-256"):
        load_dataset("fashion-mnist", str(folder), download=False, progress=False)


# ---------------------------------------------------------------------------
# 4. numerics
# ---------------------------------------------------------------------------
def synthetic_loader(n=8, seed=0):
    rng = numpy.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, 6, 6), dtype=numpy.uint8)
    return DataLoader(images, rng.integers(0, 3, n), batch_size=4, shuffle=True, seed=seed, mean=0.5, std=0.25)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_overflow_in_a_layer_stops_training_and_names_it():
    backend.manual_seed(0)
    model = tiny_model()
    model.layer2[0].conv1.params["weight"][...] = 1e38  # float32 overflows to inf in this layer
    opt = SGD(model, 0.1, momentum=0.9)
    before = {k: v.copy() for k, v in model.named_parameters().items()}
    with pytest.raises(NonFiniteError, match=r"loss became nan at epoch 1, batch 0; first non-finite value in: "
                                             r"layer2\.0\.conv1$"):
        train_one_epoch(model, synthetic_loader(), nn.CrossEntropyLoss(), opt, None, 1, progress=False)
    after = model.named_parameters()
    assert all(numpy.array_equal(before[k], after[k], equal_nan=True) for k in before)  # no update applied


def test_nonfinite_gradient_stops_training_and_names_the_parameter(monkeypatch):
    backend.manual_seed(0)
    model = tiny_model()
    bad_layer = model.layer2[0].conv2
    real_backward = bad_layer.backward

    def backward_with_inf(dout):  # e.g. an overflow inside the backward pass
        dx = real_backward(dout)
        bad_layer.grads["weight"][0, 0, 0, 0] = numpy.inf
        return dx
    monkeypatch.setattr(bad_layer, "backward", backward_with_inf)
    opt = SGD(model, 0.1)
    before = {k: v.copy() for k, v in model.named_parameters().items()}
    with pytest.raises(NonFiniteError, match=r"gradient of layer2\.0\.conv2\.weight became NaN/inf at epoch 1, "
                                             r"batch 0"):
        train_one_epoch(model, synthetic_loader(), nn.CrossEntropyLoss(), opt, None, 1, progress=False)
    assert first_nonfinite_grad(model) == "layer2.0.conv2.weight"
    assert all(numpy.array_equal(before[k], v) for k, v in model.named_parameters().items())


def test_softmax_cross_entropy_float32_at_1e4():
    """Logits of +-1e4 in float32: the loss, its gradient and the module stay finite and right."""
    rng = numpy.random.default_rng(0)
    logits = (rng.choice([-1e4, 1e4], (6, 5)) + rng.standard_normal((6, 5))).astype(f32)
    labels = rng.integers(0, 5, 6)
    loss, cache = softmax_cross_entropy_forward(logits, labels)
    dlogits = softmax_cross_entropy_backward(f32(1.0), cache)
    assert dlogits.dtype == f32 and numpy.all(numpy.isfinite(dlogits)) and numpy.isfinite(loss)
    assert numpy.allclose(dlogits.sum(axis=1), 0, atol=1e-6)  # softmax - onehot sums to 0 per row
    # float64 reference, computed independently with log-sum-exp
    z = logits.astype(numpy.float64)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= numpy.log(numpy.exp(log_p).sum(axis=1, keepdims=True))
    expected = numpy.exp(log_p)
    expected[numpy.arange(6), labels] -= 1
    assert numpy.allclose(dlogits, expected / 6, atol=1e-6)
    assert float(loss) == pytest.approx(-log_p[numpy.arange(6), labels].mean(), rel=1e-5)
    # the exact extremes: the right class far below (loss 2e4), far above (loss 0)
    fn = nn.CrossEntropyLoss()
    assert fn(numpy.array([[1e4, -1e4]], f32), numpy.array([1])) == pytest.approx(2e4)
    assert numpy.array_equal(fn.backward(), numpy.array([[1.0, -1.0]], f32))
    assert fn(numpy.array([[1e4, -1e4]], f32), numpy.array([0])) == 0.0
    assert numpy.array_equal(fn.backward(), numpy.zeros((1, 2), f32))


# ---------------------------------------------------------------------------
# 5. determinism
# ---------------------------------------------------------------------------
def few_training_steps(seed, steps=3):
    """Seeded init, shuffled and augmented batches, SGD with momentum: losses and weights."""
    backend.manual_seed(seed)
    model = tiny_model()
    opt = SGD(model, 0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    rng = numpy.random.default_rng(123)  # the same images for every seed
    loader = DataLoader(rng.integers(0, 256, (16, 1, 8, 8), dtype=numpy.uint8), rng.integers(0, 3, 16),
                        batch_size=4, shuffle=True, augment=True, pad=1)  # seeded from backend.rng()
    loss_fn, losses = nn.CrossEntropyLoss(), []
    for (x, y), _ in zip(loader, range(steps)):
        losses.append(loss_fn(model(x), y))
        model.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
    return losses, model.state_dict()


def test_same_seed_gives_bit_identical_training():
    losses_a, weights_a = few_training_steps(seed=5)
    losses_b, weights_b = few_training_steps(seed=5)
    assert losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert weights_a[k].dtype == weights_b[k].dtype and numpy.array_equal(weights_a[k], weights_b[k]), k
    losses_c, weights_c = few_training_steps(seed=6)  # not vacuous: another seed, another run
    assert losses_c != losses_a and not numpy.array_equal(weights_c["conv1.weight"], weights_a["conv1.weight"])


# ---------------------------------------------------------------------------
# 7. the command line
# ---------------------------------------------------------------------------
def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MINIRES_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "minires", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def assert_one_line_error(result, message):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.endswith(errors[0] + "\n")  # the error is the last line


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "resnet21"], "argument --model: invalid choice: 'resnet21'"),
    (["train", "--epochs", "-3"], "argument --epochs: must be an integer >= 0, got '-3'"),
    (["train", "--data-dir", "{tmp}/nowhere", "--epochs", "1"], "minires train: error: data directory"),
    (["evaluate", "--checkpoint", "{tmp}/truncated.npz"], "truncated.npz' is truncated or corrupted"),
])
def test_cli_end_to_end_errors_have_no_traceback(tmp_path, args, message):
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 half a zip file")
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], cwd=str(tmp_path))
    assert_one_line_error(result, message)
    assert os.listdir(tmp_path) == ["truncated.npz"]  # nothing written (no runs/ folder)


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "cifar100"], "argument --dataset: invalid choice: 'cifar100'"),
    (["train", "--lr", "0"], "argument --lr: must be a number > 0, got '0'"),
    (["train", "--lr", "nan"], "argument --lr: must be a number > 0, got 'nan'"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["train", "--epochs", "two"], "argument --epochs: must be an integer >= 0, got 'two'"),
    (["train", "--subset", "-5"], "argument --subset: must be an integer >= 1, got '-5'"),
    (["train", "--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["summary", "resnet21"], "argument MODEL: invalid choice: 'resnet21'"),
    (["evaluate"], "the following arguments are required: --checkpoint"),
    (["fly"], "argument command: invalid choice: 'fly'"),
])
def test_cli_more_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.splitlines()[-1], err


def bad_checkpoints(folder):
    """name -> (path, what the error line says)."""
    folder.mkdir()
    cases = {}
    path = str(folder / "version.npz")
    save_checkpoint(path, {"w": numpy.zeros(1)}, meta={"format_version": 0})
    cases["old version"] = (path, "has format version 0; this minires reads version 1")
    path = str(folder / "nomodel.npz")
    save_checkpoint(path, {"w": numpy.zeros(1)}, meta={})
    cases["no model config"] = (path, "does not say which model it holds")
    path = str(folder / "wrongkeys.npz")
    save_checkpoint(path, {"w": numpy.zeros(1)}, meta={"model": {"name": "resnet20", "in_channels": 1}})
    cases["keys of another model"] = (path, "missing keys ['bn1.bias'")
    path = str(folder / "wrongshape.npz")
    state = models.resnet20(in_channels=1).state_dict()
    state["fc.weight"] = numpy.zeros((10, 65), f32)
    save_checkpoint(path, state, meta={"model": {"name": "resnet20", "in_channels": 1}})
    cases["a wrong shape"] = (path, "'fc.weight' has shape (10, 65), expected (10, 64)")
    path = folder / "empty.npz"
    path.write_bytes(b"")
    cases["empty file"] = (str(path), "is truncated or corrupted")
    return cases


def test_cli_evaluate_bad_checkpoints(tmp_path, capsys):
    for name, (path, message) in bad_checkpoints(tmp_path / "c").items():
        with pytest.raises(SystemExit) as info:
            main(["evaluate", "--checkpoint", path])
        err = capsys.readouterr().err
        assert info.value.code == 2, name
        assert err.count("\n") == 1 and err.startswith("minires evaluate: error: ") and message in err, (name, err)


def test_checkpoint_is_readable_like_any_other_file(tmp_path):
    """mkstemp creates the temporary file 0600; the checkpoint gets the usual umask permissions."""
    import os
    import stat
    from minires.checkpoint import save_checkpoint
    path = tmp_path / "ckpt.npz"
    save_checkpoint(str(path), {"w": numpy.zeros(3, numpy.float32)}, meta={})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_train_one_epoch_takes_any_model():
    """A model without ResNet.backward's input_grad keyword (a Sequential) trains too."""
    backend.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    opt = SGD(model, 0.1)
    before = model.named_parameters()["1.weight"].copy()
    loss, acc, _, _ = train_one_epoch(model, synthetic_loader(), nn.CrossEntropyLoss(), opt, None, 1,
                                      progress=False)
    assert numpy.isfinite(loss) and 0 <= acc <= 1
    assert not numpy.array_equal(model.named_parameters()["1.weight"], before)
