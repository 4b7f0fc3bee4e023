"""Spread independent chunks of NumPy work over the CPU cores.

NumPy runs element-wise work (copies, additions, the im2col gathers) on ONE
core; only its matrix products (BLAS) use several. The fast conv and
BatchNorm paths cut the batch into chunks anyway, so that one chunk's work
fits in a core's cache. :func:`map_chunks` shares those chunks between the
calling thread and a pool of worker threads (one thread per core in all),
and asks BLAS for one thread per call while they run: every core then does
the copies *and* the GEMM of its own chunk.
Plain Python threads can do this because NumPy releases the GIL inside its
loops and BLAS calls. docs/performance.md measures what this buys over one
chunk after another with BLAS running each GEMM on all cores
(``MINIRES_NUM_THREADS=1``).

Results do not depend on the number of threads or on timing: each chunk
writes its own slice of an output, and per-chunk partial results come back
in chunk order, for the caller to add in that order.

Each worker thread also keeps its own reusable work arrays
(:func:`scratch`): a fresh multi-MiB NumPy array costs page faults every
time it is allocated, because the allocator hands big blocks back to the
system when they are freed.

The number of threads is ``MINIRES_NUM_THREADS`` if set, else the number of
CPUs this process may use; :func:`set_num_threads` changes it. BLAS is
limited through the small ``threadpoolctl`` package, which works for the
pthreads OpenBLAS that NumPy's wheels ship: one process-wide thread count,
set here and obeyed by the workers. Without threadpoolctl, or with another
BLAS (an OpenMP build keeps one count per thread; Accelerate cannot be
limited), BLAS's own threads would fight ours for the cores, so the chunks
then simply run one after another. None of this applies to CuPy: a GPU
gets one big chunk.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy

_num_threads = None      # None: not decided yet (see num_threads)
_pool = None             # the ThreadPoolExecutor, created on first use
_pool_key = None         # (pid, threads) the pool was made for
_blas = None             # threadpoolctl controller, False when unavailable
_inside = threading.local()  # .worker is True in worker threads: no nested pools
_buffers = threading.local()  # .arrays: each thread's scratch arrays, by (name, dtype)
_lock = threading.Lock()      # one map_chunks at a time sets and restores the BLAS limit


def num_threads():
    """Worker threads used by :func:`map_chunks` (>= 1)."""
    global _num_threads
    if _num_threads is None:
        env = os.environ.get("MINIRES_NUM_THREADS", "").strip()
        if env:
            try:
                set_num_threads(env)
            except ValueError as err:
                raise ValueError(f"MINIRES_NUM_THREADS: {err}") from None
        else:
            try:
                # honours taskset and cpusets, not CPU quotas (docker --cpus):
                # set MINIRES_NUM_THREADS there
                _num_threads = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                _num_threads = os.cpu_count() or 1
    return _num_threads


def set_num_threads(n):
    """Use ``n`` worker threads from now on (1 = run chunks one after another)."""
    global _num_threads
    try:
        value = int(n)
    except (TypeError, ValueError):
        value = None
    if value is None or value < 1 or (not isinstance(n, str) and value != n):
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    _num_threads = value


def _blas_controller():
    """threadpoolctl's controller of NumPy's BLAS (found once), or False.

    False unless every BLAS library loaded is a pthreads build (one thread
    count for the whole process, which the workers then obey).
    """
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas = False
            return _blas
        blas = ThreadpoolController().select(user_api="blas")
        layers = [lib.info().get("threading_layer") for lib in blas.lib_controllers]
        _blas = blas if layers and all(layer == "pthreads" for layer in layers) else False
    return _blas


def _mark_worker_thread():
    _inside.worker = True


def _executor(threads):
    """The shared pool; a new one after fork() (threads do not survive a fork)."""
    global _pool, _pool_key
    key = (os.getpid(), threads)
    if _pool_key != key:
        if _pool is not None and _pool_key[0] == key[0]:
            _pool.shutdown(wait=False)  # the thread count changed
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="minires",
                                   initializer=_mark_worker_thread)
        _pool_key = key
    return _pool


#: The number of chunks is a multiple of this (where the batch allows), so that
#: 2 or 4 worker threads get equal shares. It does not depend on the actual
#: number of threads, so neither do the chunks, nor the rounding of sums over them.
CHUNKS_MULTIPLE = 4


def batch_chunks(xp, N, bytes_per_item, target_bytes):
    """Equal slices of range(N) holding at most ``target_bytes`` each; one slice on a GPU.

    ``bytes_per_item`` is the work memory one item (one image) needs. (A
    single item larger than ``target_bytes`` still makes a chunk of its own.)
    """
    if xp is not numpy:
        return [slice(0, N)]
    count = -(-N * bytes_per_item // max(1, target_bytes))   # ceil: chunks of <= target_bytes
    if count > 1:  # (small work stays one chunk)
        count = min(N, -(-count // CHUNKS_MULTIPLE) * CHUNKS_MULTIPLE)
    count = max(1, count)
    bounds = [N * k // count for k in range(count + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def chunks_of(xp, a, target_bytes=1 << 20):
    """:func:`batch_chunks` over the first axis of ``a`` (``[...]`` for a 0-d array).

    The default of 1 MiB suits element-wise work (ReLU, BatchNorm): a chunk
    stays in the core's cache from one operation on it to the next.
    """
    if a.ndim == 0:
        return [Ellipsis]
    per_item = a.nbytes // a.shape[0] if a.shape[0] else 0
    return batch_chunks(xp, a.shape[0], per_item, target_bytes)


def map_chunks(fn, chunks):
    """``[fn(chunk) for chunk in chunks]``, the calls spread over the CPU cores.

    ``fn`` must only write to places no other chunk touches (its own slice of
    an output); anything to be summed over chunks it returns instead.

    The calling thread works too: it and ``threads - 1`` pool threads each take
    the next chunk nobody has taken yet, until none is left. (Handing every
    chunk to the pool and waiting costs a thread wake-up per chunk, which adds
    up over the many short chunks of a step: docs/performance.md.) Taking
    chunks as they come also balances the work when one core is slower than
    the other.
    """
    chunks = list(chunks)
    threads = min(num_threads(), len(chunks))
    blas = _blas_controller() if threads > 1 else False
    if threads < 2 or not blas or getattr(_inside, "worker", False):
        return [fn(chunk) for chunk in chunks]
    results = [None] * len(chunks)
    untaken = iter(range(len(chunks)))  # shared by the threads below
    take = threading.Lock()

    def work():  # run chunks until none is left
        while True:
            with take:
                k = next(untaken, None)
            if k is None:
                return
            try:
                results[k] = fn(chunks[k])
            except BaseException:
                with take:
                    for _ in untaken:  # take the rest: the other threads stop after their chunk
                        pass
                raise

    # The lock: two callers at once would each save and restore the BLAS
    # thread count, and could leave it at 1 for good.
    with _lock, blas.limit(limits=1):  # one BLAS thread per thread
        pool = _executor(num_threads() - 1)
        helpers = [pool.submit(work) for _ in range(threads - 1)]
        _inside.worker = True  # a map_chunks inside fn runs inline here too
        try:
            work()
        finally:
            _inside.worker = False
            for helper in helpers:
                helper.exception()  # wait: no helper may still be writing when we return
        for helper in helpers:
            helper.result()  # re-raises a helper's error
    return results


def scratch(xp, name, shape, dtype):
    """A work array of this thread, reused from call to call. Contents: garbage.

    For NumPy, one flat buffer per (thread, name, dtype), grown when too
    small; the caller must write before reading and must not keep the array
    (or a view of it) beyond its own call. On CuPy a new array (CuPy's memory
    pool already reuses device memory).
    """
    if xp is not numpy:
        return xp.empty(shape, dtype=dtype)
    dtype = numpy.dtype(dtype)
    size = 1
    for extent in shape:
        size *= int(extent)
    key = (name, dtype.str)
    if not hasattr(_buffers, "arrays"):
        _buffers.arrays = {}  # first call in this thread
    store = _buffers.arrays
    buf = store.get(key)
    if buf is None or buf.size < size:
        buf = store[key] = numpy.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)
