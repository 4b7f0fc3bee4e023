"""The one switch between NumPy (CPU) and CuPy (GPU).

Every op asks for its array module ``xp`` with :func:`get_array_module` and is
written once against it. Which module is *active* (where new parameters and
data batches are created) is chosen with :func:`set_backend` or the
``MINIRES_BACKEND`` environment variable (``numpy``, the default, or ``cupy``).

Moving data between host and device is always explicit: :func:`to_numpy` and
:func:`to_device`. Mixing a NumPy and a CuPy array in one call is an error, not a
silent copy.

Random numbers come from one NumPy generator (:func:`rng`, reseeded by
:func:`manual_seed`), so the same seed gives the same initial weights and the
same data order on both backends.
"""
import os

import numpy

_INSTALL_HELP = (
    "the 'cupy' backend needs CuPy and a CUDA GPU. Install the CuPy wheel that "
    "matches your CUDA toolkit, e.g. `pip install -e .[cuda]` (cupy-cuda12x), or "
    "use the default backend: set_backend('numpy') / MINIRES_BACKEND=numpy."
)
# CuPy is installed, so reinstalling it would change nothing: the GPU side is missing.
_DRIVER_HELP = (
    "CuPy {version} is installed, but the 'cupy' backend also needs an NVIDIA GPU and its "
    "driver. Check with `nvidia-smi` (it should list a GPU; if the command is missing, the "
    "driver is not installed); in a container, start it with the GPU passed in (e.g. "
    "`docker run --gpus all`); CuPy's wheel must match the driver's CUDA version "
    "(cupy-cuda12x for CUDA 12). Without a GPU, use the default backend: "
    "set_backend('numpy') / MINIRES_BACKEND=numpy."
)

_active = numpy
_rng = numpy.random.default_rng(0)


def _import_cupy():
    """Return the cupy module, or raise a RuntimeError that says how to get it
    (how to install CuPy when it is missing; what to check on the GPU side
    when CuPy is there but finds no GPU or driver)."""
    try:
        import cupy
    except ImportError as err:
        raise RuntimeError("CuPy is not installed: " + _INSTALL_HELP) from err
    driver_help = _DRIVER_HELP.format(version=getattr(cupy, "__version__", "?"))
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy found no GPU: " + driver_help)
    except cupy.cuda.runtime.CUDARuntimeError as err:
        raise RuntimeError(f"CuPy cannot use a GPU ({err}): " + driver_help) from err
    return cupy


def cupy_available():
    """True when CuPy is installed and sees at least one GPU."""
    try:
        _import_cupy()
    except RuntimeError:
        return False
    return True


def set_backend(name):
    """Make ``"numpy"`` or ``"cupy"`` the active array module and return it."""
    global _active
    if name == "numpy":
        _active = numpy
    elif name == "cupy":
        _active = _import_cupy()
    else:
        raise ValueError(f"unknown backend {name!r}: expected 'numpy' or 'cupy'")
    return _active


def get_backend():
    """The active array module (``numpy`` or ``cupy``)."""
    return _active


def backend_name():
    """``"numpy"`` or ``"cupy"``."""
    return _active.__name__


def _is_cupy_array(a):
    return type(a).__module__.startswith("cupy")


def get_array_module(*arrays):
    """The array module of ``arrays``: ``cupy`` if they are CuPy arrays, else ``numpy``.

    Non-array arguments (None, Python numbers) are ignored. NumPy and CuPy
    arrays mixed in one call raise a TypeError instead of a silent transfer.
    """
    kinds = set()
    for a in arrays:
        if _is_cupy_array(a):
            kinds.add("cupy")
        elif isinstance(a, numpy.ndarray):
            kinds.add("numpy")
    if kinds == {"cupy", "numpy"}:
        found = ", ".join(
            f"{type(a).__module__}.{type(a).__name__}{tuple(a.shape)}"
            for a in arrays if hasattr(a, "shape")
        )
        raise TypeError(
            f"NumPy and CuPy arrays mixed in one call ({found}). Convert explicitly: "
            "minires.backend.to_device(a) moves a NumPy array to the active backend, "
            "minires.backend.to_numpy(a) brings a CuPy array back to the host."
        )
    if "cupy" in kinds:
        import cupy
        return cupy
    return numpy


def to_numpy(a):
    """A NumPy copy of ``a`` (a no-op view for NumPy arrays and scalars)."""
    if _is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


def to_device(a, dtype=None):
    """``a`` as an array of the active backend (copied to the GPU if needed)."""
    if _active is numpy:
        out = to_numpy(a)
    else:
        out = _active.asarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


def rng():
    """The shared NumPy random generator (weights init, shuffling, augmentation)."""
    return _rng


def manual_seed(seed):
    """Reseed the shared generator; returns it."""
    global _rng
    _rng = numpy.random.default_rng(seed)
    return _rng


if os.environ.get("MINIRES_BACKEND"):
    set_backend(os.environ["MINIRES_BACKEND"])
