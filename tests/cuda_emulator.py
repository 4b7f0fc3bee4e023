"""Run CUDA kernel sources on the CPU: g++ plus a small prelude, called through ctypes.

The kernels of ``minires/kernels/cuda.py`` use only ``threadIdx``,
``blockIdx``, ``blockDim``, ``gridDim``, ``__shared__`` arrays and
``__syncthreads()``. The prelude defines those as plain C++, so the *same*
source string that CuPy compiles builds here as a shared library:

* ``__global__`` vanishes and ``__device__`` becomes ``inline``;
* ``__shared__`` becomes ``static``: one array for all threads of the block;
* the index variables are globals (``threadIdx`` / ``blockIdx`` per OS thread);
* ``__syncthreads()`` is a pthread barrier across the block's threads.

:meth:`Kernels.launch` runs the blocks one after another. With ``block=1``
(the default) a block is one call in the calling thread; with ``block > 1``
each thread of the block is a real OS thread, so a reduction that forgets a
``__syncthreads`` can be caught. Arguments are checked against the kernel's
C signature (parsed from the source), output arrays are filled with NaN
first (an element no thread writes shows up; ``INOUT`` arrays, updated in
place, start with their values), and every array is surrounded
by guard bytes that must survive the launch (a write out of bounds raises).
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy

PRELUDE = r"""
#include <pthread.h>
#include <cmath>
using std::sqrt;
using std::isfinite;
using std::exp;
using std::log;
struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static emu_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
static pthread_barrier_t emu_barrier;
static bool emu_barrier_ready = false;

extern "C" void emu_configure(unsigned grid, unsigned block) {
    gridDim.x = grid;
    blockDim.x = block;
    if (emu_barrier_ready) pthread_barrier_destroy(&emu_barrier);
    pthread_barrier_init(&emu_barrier, nullptr, block);
    emu_barrier_ready = true;
}
extern "C" void emu_set_thread(unsigned block, unsigned thread) {
    blockIdx.x = block;
    threadIdx.x = thread;
}
static inline void __syncthreads() {
    if (blockDim.x > 1) pthread_barrier_wait(&emu_barrier);
}
#define __global__
#define __device__ inline
#define __shared__ static
#line 1 "kernel"
"""

CXXFLAGS = ["-O1", "-shared", "-fPIC", "-std=c++17", "-pthread", "-Wall", "-Werror"]

_SCALARS = {  # C type -> (ctypes type, numpy scalar type it takes)
    "int": (ctypes.c_int, numpy.int32),
    "long long": (ctypes.c_longlong, numpy.int64),
    "unsigned long long": (ctypes.c_ulonglong, numpy.uint64),  # device addresses
    "float": (ctypes.c_float, numpy.float32),
    "double": (ctypes.c_double, numpy.float64),
}
_GUARD = 64  # bytes of 0xA5 before and after every array
_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def compiler_available():
    return shutil.which("g++") is not None


def _build(source):
    """Compile prelude + source once per content; return the path of the .so."""
    text = PRELUDE + source
    key = hashlib.sha256((text + " ".join(CXXFLAGS)).encode()).hexdigest()[:16]
    cache = os.path.join(tempfile.gettempdir(), f"minires-cuda-emu-{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"kernels-{key}.so")
    if not os.path.exists(lib):
        with tempfile.TemporaryDirectory(dir=cache) as work:
            src, tmp = os.path.join(work, "kernels.cpp"), os.path.join(work, "kernels.so")
            with open(src, "w") as f:
                f.write(text)
            result = subprocess.run(["g++", *CXXFLAGS, src, "-o", tmp], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"g++ failed on the kernel source:\n{result.stderr}")
            os.replace(tmp, lib)  # atomic: a parallel test run never sees half a file
    return lib


def _parse_params(params, T):
    """C parameter list -> [(kind, type, role)]: kind 'pointer' or 'scalar'; role
    'in' (const pointers, scalars), 'out' (other pointers) or 'inout' (``INOUT``
    pointers: read, then updated in place)."""
    parsed = []
    for p in params.split(","):
        words = p.replace("*", " * ").split()[:-1]  # drop the parameter name
        const, inout = "const" in words, "INOUT" in words
        words = [w for w in words if w not in ("const", "__restrict__", "INOUT")]
        pointer = "*" in words
        ctype = " ".join(w for w in words if w != "*")
        ctype = T if ctype == "T" else ctype
        if ctype not in _SCALARS:
            raise ValueError(f"emulator: unsupported parameter type in {p.strip()!r}")
        role = "inout" if inout else "out" if pointer and not const else "in"
        parsed.append(("pointer" if pointer else "scalar", ctype, role))
    return parsed


class Kernels:
    """The ``extern "C" __global__`` kernels of ``source``, built for the CPU.

    ``T`` names the element type when the source uses a ``T`` typedef
    ("float" or "double"), so pointer arguments can be checked.
    """

    def __init__(self, source, T="float"):
        self.lib = ctypes.CDLL(_build(source))
        self.lib.emu_configure.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self.lib.emu_set_thread.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self.signatures = {name: _parse_params(params, T) for name, params in _SIGNATURE.findall(source)}
        for name, params in self.signatures.items():
            getattr(self.lib, name).argtypes = [
                ctypes.c_void_p if kind == "pointer" else _SCALARS[ctype][0] for kind, ctype, _ in params
            ]

    def launch(self, name, args, grid=1, block=1):
        """Run kernel ``name`` on ``args`` with ``grid`` blocks of ``block`` threads.

        Arrays must be C-contiguous with the parameter's element type; output
        arrays (non-const pointers, ``INOUT`` ones too) are written in place. Scalars: Python
        numbers, or NumPy scalars of exactly the parameter's type.
        """
        params = self.signatures[name]
        if len(args) != len(params):
            raise TypeError(f"{name}: expected {len(params)} arguments, got {len(args)}")
        c_args, guarded = [], []
        for k, ((kind, ctype, role), a) in enumerate(zip(params, args)):
            if kind == "pointer":
                c_args.append(self._guarded_pointer(name, k, ctype, a, role, guarded))
            else:
                c_args.append(_scalar(name, k, ctype, a))
        self._run(getattr(self.lib, name), c_args, grid, block)
        for k, raw, inner, a, role in guarded:
            if (raw[:_GUARD] != 0xA5).any() or (raw[_GUARD + inner.nbytes:] != 0xA5).any():
                raise AssertionError(f"{name} wrote outside argument {k} (shape {a.shape})")
            if role != "in":
                a[...] = inner

    @staticmethod
    def _guarded_pointer(name, k, ctype, a, role, guarded):
        """Copy array a into a buffer framed by guard bytes; return the pointer to the copy."""
        if not isinstance(a, numpy.ndarray) or not a.flags.c_contiguous:
            raise TypeError(f"{name}: argument {k} must be a C-contiguous NumPy array")
        if a.dtype != _SCALARS[ctype][1]:
            raise TypeError(f"{name}: argument {k} must be {ctype}*, got dtype {a.dtype}")
        raw = numpy.full(a.nbytes + 2 * _GUARD, 0xA5, dtype=numpy.uint8)
        inner = raw[_GUARD:_GUARD + a.nbytes].view(a.dtype).reshape(a.shape)
        inner[...] = numpy.nan if role == "out" else a  # outputs start as NaN: unwritten shows
        guarded.append((k, raw, inner, a, role))
        return inner.ctypes.data

    def _run(self, kernel, c_args, grid, block):
        self.lib.emu_configure(grid, block)
        for b in range(grid):
            if block == 1:
                self.lib.emu_set_thread(b, 0)
                kernel(*c_args)
                continue

            def thread(t, b=b):  # one OS thread per CUDA thread; ctypes drops the GIL
                self.lib.emu_set_thread(b, t)
                kernel(*c_args)

            threads = [threading.Thread(target=thread, args=(t,), daemon=True) for t in range(block)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
                if t.is_alive():
                    raise AssertionError("kernel hangs: threads of a block wait at different __syncthreads")


def _scalar(name, k, ctype, value):
    """Check a scalar argument against its C type (ctypes would truncate silently)."""
    numpy_type = _SCALARS[ctype][1]
    if isinstance(value, numpy.generic):
        if type(value) is not numpy_type:
            raise TypeError(f"{name}: argument {k} is {ctype}, got {type(value).__name__}")
        return value.item()
    if ctype in ("int", "long long"):
        info = numpy.iinfo(numpy_type)
        if not isinstance(value, int) or not info.min <= value <= info.max:
            raise TypeError(f"{name}: argument {k} is {ctype}, got {value!r}")
    elif not isinstance(value, (int, float)):
        raise TypeError(f"{name}: argument {k} is {ctype}, got {value!r}")
    return value


def compile_kernels(source, T="float"):
    """:class:`Kernels` of ``source``; ``T`` is the C type of its ``T`` typedef."""
    return Kernels(source, T)


def nvcc_check(source):
    """Compile the source for a real GPU with nvcc (to PTX); return its error log, '' if fine.

    CuPy compiles with NVRTC; nvcc --ptx catches the same syntax and type
    errors. Raises FileNotFoundError without nvcc.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc")
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "kernels.cu")
        with open(src, "w") as f:
            f.write(source)
        result = subprocess.run(
            [nvcc, "--ptx", src, "-o", os.path.join(work, "kernels.ptx")],
            capture_output=True, text=True,
        )
    return "" if result.returncode == 0 else result.stdout + result.stderr
