"""A strict stand-in for CuPy, so CI (which has no GPU) runs minires's CuPy code paths.

Put ``tests/fake_cupy`` first on ``PYTHONPATH`` and ``import cupy`` gives this
module (tests/test_fake_cupy.py does that in a subprocess). It is NumPy
underneath, with CuPy's rules on top where minires could break them:

* ``cupy.ndarray`` is *not* a NumPy array: ``numpy.asarray(a)`` raises
  TypeError, as real CuPy does; ``a.get()`` / ``cupy.asnumpy(a)`` are the
  explicit way back;
* a NumPy array (not a scalar) given to a CuPy function, ufunc or ``out=`` raises;
* reductions return 0-d device arrays, not Python or NumPy scalars, and
  ``host_transfers`` counts each device -> host transfer (a sync on a GPU);
* ``device_ops`` counts the operations that would each launch a kernel (or a
  copy) on a GPU: every ufunc, reduction, product, fill, copy, item assignment
  and RawModule kernel, but not views (reshape, transpose, slicing) or
  ``empty``. A training step on a GPU is launch-bound, so this count is what
  its speed follows (tests/test_fake_cupy.py keeps it in check);
* ``RawModule`` compiles the CUDA source with g++ and runs the kernels on the
  CPU (tests/cuda_emulator.py); a Python int passed to a kernel raises, since
  real CuPy would pass it as a 64-bit integer.

It does not check speed, asynchrony, or that a NumPy function used on ``xp``
also exists in CuPy: for those, run ``pytest -m gpu`` on a real GPU
(.ci/gpu-check).
"""
import os
import sys
import types

import numpy
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "0.0-fake"

#: Device -> host transfers so far (each one is a sync on a real GPU):
#: float(a), int(a), bool(a), a.item(), a.get(), asnumpy(a), ...
host_transfers = 0
#: Operations so far that would each be a kernel launch (or a copy) on a GPU.
device_ops = 0


def _to_host():
    global host_transfers
    host_transfers += 1


def _launched(result=None, *inputs):
    """Count one device operation, unless ``result`` is only a view of an input or
    no array at all (a dtype, a shape: host-side answers)."""
    global device_ops
    if not isinstance(result, (numpy.ndarray, numpy.generic, type(None))):
        return
    if isinstance(result, numpy.ndarray) and any(
            isinstance(a, numpy.ndarray) and result.base is not None and numpy.shares_memory(result, a)
            for a in inputs):
        return
    device_ops += 1


def _unwrap(a, where):
    """Device arrays -> their NumPy storage; a host NumPy array here is an error."""
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, numpy.ndarray) and a.ndim > 0:
        raise TypeError(f"fake cupy: a NumPy array of shape {a.shape} passed to {where}")
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(x, where) for x in a)
    if isinstance(a, dict):
        return {k: _unwrap(v, where) for k, v in a.items()}
    return a


def _wrap(r):
    """NumPy results -> device arrays (scalars become 0-d arrays, as in CuPy)."""
    if isinstance(r, numpy.ndarray):
        return ndarray(r)
    if isinstance(r, numpy.generic):
        return ndarray(numpy.asarray(r))
    if isinstance(r, (tuple, list)):
        return type(r)(_wrap(x) for x in r)
    return r


class ndarray(NDArrayOperatorsMixin):
    """A device array: NumPy storage in ``_a``, never handed to NumPy implicitly."""

    def __init__(self, a):
        object.__setattr__(self, "_a", a)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"ufunc {ufunc.__name__}"
        args = _unwrap(inputs, where)
        if "out" in kwargs:
            outs = kwargs["out"]
            if not all(isinstance(o, ndarray) for o in outs):
                raise TypeError(f"fake cupy: out= of {where} must be a device array")
            kwargs["out"] = tuple(o._a for o in outs)
            getattr(ufunc, method)(*args, **kwargs)
            _launched()
            return outs[0] if len(outs) == 1 else outs
        _launched()
        return _wrap(getattr(ufunc, method)(*args, **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        # numpy.f(device_array) dispatches to the device version, as in CuPy
        args, kwargs = _unwrap(args, func.__name__), _unwrap(kwargs, func.__name__)
        result = func(*args, **kwargs)
        _launched(result, *args)
        return _wrap(result)

    def __getattr__(self, name):  # methods and attributes of the storage, results wrapped
        if name.startswith("__"):  # not __array_interface__ & co.: NumPy would read the storage
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            result = attr(*_unwrap(args, "." + name), **_unwrap(kwargs, "." + name))
            _launched(result, self._a)
            return _wrap(result)
        return method

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    # CuPy's a.data is a MemoryPointer; .ptr its address (host memory here, for the emulator)
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data))

    def get(self, stream=None, out=None):
        _to_host()
        return self._a.copy()

    def item(self):
        _to_host()
        return self._a.item()

    def tolist(self):
        _to_host()
        return self._a.tolist()

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, numpy.ndarray) and value.ndim > 0:
            raise TypeError(f"fake cupy: a NumPy array of shape {value.shape} assigned into a device array")
        self._a[_index(key)] = value._a if isinstance(value, ndarray) else value
        _launched()

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __float__(self):
        _to_host()
        return float(self._a)

    def __int__(self):
        _to_host()
        return int(self._a)

    def __index__(self):
        _to_host()
        return int(self._a)

    def __bool__(self):
        _to_host()
        return bool(self._a)

    def __repr__(self):
        return f"fake_cupy.{self._a!r}"

    def __format__(self, spec):
        _to_host()
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __reduce__(self):
        raise TypeError("fake cupy: a device array cannot be pickled here (save NumPy copies)")


def _index(key):
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


def __getattr__(name):
    """Every other name: NumPy's, with device arrays in and out (types and constants as they are)."""
    attr = getattr(numpy, name)
    if isinstance(attr, type) or not callable(attr):
        return attr

    def function(*args, **kwargs):
        args, kwargs = _unwrap(args, name), _unwrap(kwargs, name)
        result = attr(*args, **kwargs)
        if not name.startswith("empty"):  # allocation alone launches nothing
            _launched(result, *args)
        return _wrap(result)
    function.__name__ = name
    return function


def asarray(a, dtype=None, order=None):
    """Host data -> a device copy; a device array stays (cast if dtype says so)."""
    if isinstance(a, ndarray):
        result = numpy.asarray(a._a, dtype=dtype, order=order)
        _launched(result, a._a)  # a cast is a kernel, the same array is nothing
        return ndarray(result)
    _launched()  # host -> device copy
    return ndarray(numpy.array(a, dtype=dtype, order=order))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    _launched()
    return ndarray(numpy.array(a._a if isinstance(a, ndarray) else a, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, out=None):
    if isinstance(a, ndarray):
        _to_host()
    return a._a.copy() if isinstance(a, ndarray) else numpy.asarray(a)


def ascontiguousarray(a, dtype=None):
    a = _unwrap(a, "ascontiguousarray")
    result = numpy.ascontiguousarray(a, dtype=dtype)
    if result is not a:
        _launched(result, a)
    return ndarray(result)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else numpy


# ---- cupy.cuda: one pretend device ----
class CUDARuntimeError(RuntimeError):
    pass


class Device:
    def __init__(self, device_id=0):
        self.id = device_id

    def synchronize(self):
        pass


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_pool = _MemoryPool()


def get_default_memory_pool():
    return _pool


cuda = types.ModuleType("cupy.cuda")
cuda.Device = Device
cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError)
sys.modules["cupy.cuda"] = cuda


# ---- RawModule: the CUDA source, compiled with g++ and run on the CPU ----
class RawModule:
    def __init__(self, code):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/
        import cuda_emulator
        self._kernels = cuda_emulator.compile_kernels(code, "double" if "typedef double T" in code else "float")

    def get_function(self, name):
        def launch(grid, block, args):
            for k, a in enumerate(args):
                if isinstance(a, numpy.ndarray):
                    raise TypeError(f"fake cupy: kernel {name} argument {k} is a NumPy array")
                if isinstance(a, int):
                    raise TypeError(f"fake cupy: kernel {name} argument {k} is a Python int "
                                    "(CuPy passes it as a 64-bit integer; give a numpy.int32/int64)")
            _launched()
            # at most 4 blocks of 1 thread: the kernels' grid-stride loops cover the rest
            self._kernels.launch(name, [a._a if isinstance(a, ndarray) else a for a in args],
                                 min(grid[0], 4), 1)
        return launch
