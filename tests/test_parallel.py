"""minires.kernels.parallel (the engine): chunks of NumPy work on all cores, per-thread scratch arrays.

The promise that matters most: results do not depend on the number of
threads, bit for bit (each chunk writes its own slice; partial sums are added
in chunk order).
"""
import threading
import time

import numpy
import pytest

from minires.kernels import batchnorm, conv, parallel
from minires.kernels.activation import relu_backward, relu_forward

pytestmark = pytest.mark.engine  # tests of the engine's internals, not of the math


@pytest.fixture
def threads():
    """Set the thread count for one test, restore it afterwards."""
    saved = parallel.num_threads()
    yield parallel.set_num_threads
    parallel.set_num_threads(saved)


@pytest.mark.parametrize("N, per_item, target", [(103, 8, 80), (128, 604_160, 8 << 20), (3, 10, 1),
                                                   (128, 150_528, 8 << 20), (10, 1, 1 << 20)])
def test_batch_chunks_are_equal_and_cover_the_batch(N, per_item, target):
    chunks = parallel.batch_chunks(numpy, N, per_item, target)
    assert chunks[0].start == 0 and chunks[-1].stop == N
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    sizes = [c.stop - c.start for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert max(sizes) * per_item <= max(target, per_item)  # about target_bytes, never much more
    # a multiple of 4 chunks (equal shares for 2 or 4 threads), unless one is enough or N is smaller
    assert len(chunks) == 1 or len(chunks) % parallel.CHUNKS_MULTIPLE == 0 or len(chunks) == N


def test_one_chunk_on_a_gpu():
    class FakeCupy:
        pass
    assert parallel.batch_chunks(FakeCupy, 128, 10 << 20, 1) == [slice(0, 128)]


def test_map_chunks_returns_results_in_chunk_order(threads):
    threads(4)
    chunks = parallel.batch_chunks(numpy, 103, 8, 80)
    assert parallel.map_chunks(lambda c: (c.start, c.stop), chunks) == [(c.start, c.stop) for c in chunks]


def test_map_chunks_shares_the_chunks_between_the_caller_and_a_pool_thread(threads):
    threads(2)
    if not parallel._blas_controller():
        pytest.skip("threadpoolctl not installed: chunks run one after another")

    def slow_chunk(c):  # long enough that neither thread can take all chunks alone
        time.sleep(0.1)
        return threading.current_thread().name

    names = parallel.map_chunks(slow_chunk, range(8))
    assert threading.current_thread().name in names
    assert any(name.startswith("minires") for name in names)
    assert len(set(names)) == 2


def test_map_chunks_waits_for_every_chunk_when_one_fails(threads):
    threads(2)
    done = []

    def chunk(c):
        time.sleep(0.01)
        if c == 0:
            raise ValueError("chunk 0 is bad")
        done.append(c)

    with pytest.raises(ValueError, match="chunk 0 is bad"):
        parallel.map_chunks(chunk, range(20))
    finished = len(done)
    time.sleep(0.05)
    assert len(done) == finished  # nothing still running after the call returned
    assert finished < 19  # the other thread stopped taking chunks after the failure


def test_map_chunks_raises_the_workers_error(threads):
    threads(2)

    def fail_on_three(c):
        if c == 3:
            raise ValueError("chunk 3 is bad")
        return c

    with pytest.raises(ValueError, match="chunk 3 is bad"):
        parallel.map_chunks(fail_on_three, range(6))


def test_nested_map_chunks_runs_inline(threads):
    threads(2)  # a nested pool call from a worker would deadlock a 2-thread pool
    result = parallel.map_chunks(lambda c: sum(parallel.map_chunks(lambda d: d * c, range(4))), range(4))
    assert result == [6 * c for c in range(4)]


def test_without_threadpoolctl_chunks_run_in_this_thread(threads, monkeypatch):
    threads(2)
    monkeypatch.setattr(parallel, "_blas", False)
    names = parallel.map_chunks(lambda c: threading.current_thread().name, range(4))
    assert names == [threading.current_thread().name] * 4


def test_a_new_pool_after_fork(threads, monkeypatch):
    threads(2)
    parallel.map_chunks(lambda c: c, range(2))
    first = parallel._pool
    monkeypatch.setattr(parallel.os, "getpid", lambda: -1)  # what a forked child sees
    parallel.map_chunks(lambda c: c, range(2))
    assert parallel._pool is not first


@pytest.mark.parametrize("bad", [0, -1, "two", "", None, 1.5])
def test_thread_count_must_be_a_positive_integer(bad, threads):
    with pytest.raises(ValueError, match="positive integer"):
        threads(bad)


def test_thread_count_from_the_environment(threads, monkeypatch):
    monkeypatch.setattr(parallel, "_num_threads", None)
    monkeypatch.setenv("MINIRES_NUM_THREADS", "3")
    assert parallel.num_threads() == 3
    monkeypatch.setattr(parallel, "_num_threads", None)
    monkeypatch.setenv("MINIRES_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="MINIRES_NUM_THREADS: .*positive integer"):
        parallel.num_threads()


def test_scratch_is_reused_per_thread_and_name():
    a = parallel.scratch(numpy, "test-a", (4, 5), numpy.float32)
    b = parallel.scratch(numpy, "test-a", (2, 3), numpy.float32)  # smaller: same memory
    assert numpy.shares_memory(a, b)
    c = parallel.scratch(numpy, "test-b", (2, 3), numpy.float32)
    d = parallel.scratch(numpy, "test-a", (2, 3), numpy.float64)
    assert not numpy.shares_memory(a, c) and not numpy.shares_memory(a, d)
    big = parallel.scratch(numpy, "test-a", (10, 10), numpy.float32)  # grows
    assert big.shape == (10, 10) and big.dtype == numpy.float32
    other = []
    t = threading.Thread(target=lambda: other.append(parallel.scratch(numpy, "test-a", (10, 10), numpy.float32)))
    t.start()
    t.join()
    assert not numpy.shares_memory(big, other[0])


def _step_results(rng):
    """conv, BatchNorm and ReLU forward + backward on a batch big enough for many chunks."""
    x = rng.standard_normal((24, 8, 12, 12)).astype(numpy.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(numpy.float32)
    out, conv_cache = conv.conv2d_forward(x, w, None, 1, 1)
    gamma, beta = numpy.ones(8, numpy.float32), numpy.zeros(8, numpy.float32)
    mean, var = numpy.zeros(8, numpy.float32), numpy.ones(8, numpy.float32)
    bn_out, bn_cache = batchnorm.batchnorm2d_forward(out, gamma, beta, mean, var)
    act, relu_cache = relu_forward(bn_out)
    dout = rng.standard_normal(act.shape).astype(numpy.float32)
    d_bn = relu_backward(dout, relu_cache)
    d_conv, dgamma, dbeta = batchnorm.batchnorm2d_backward(d_bn, bn_cache)
    dx, dw, _ = conv.conv2d_backward(d_conv, conv_cache)
    return [out, bn_out, act, mean, var, d_bn, d_conv, dgamma, dbeta, dx, dw]


def test_results_do_not_depend_on_the_thread_count(threads, monkeypatch):
    monkeypatch.setattr(conv, "CHUNK_BYTES", 20_000)       # several chunks per call
    monkeypatch.setattr(batchnorm, "CHUNK_BYTES", 10_000)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        runs.append(_step_results(numpy.random.default_rng(0)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.dtype == numpy.float32
            assert numpy.array_equal(a, b)  # bit for bit


def test_two_callers_at_once_leave_the_blas_threads_as_they_were(threads):
    threads(2)
    blas = parallel._blas_controller()
    if not blas:
        pytest.skip("no pthreads BLAS that threadpoolctl can limit")
    before = [lib.num_threads for lib in blas.lib_controllers]
    start = threading.Barrier(2)

    def caller():
        start.wait()
        for i in range(20):
            parallel.map_chunks(lambda c: time.sleep(0.001 * (c + i % 3)), range(4))  # overlapping calls

    callers = [threading.Thread(target=caller) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert [lib.num_threads for lib in blas.lib_controllers] == before


def test_relu_of_an_empty_batch():
    x = numpy.zeros((0, 3), numpy.float32)
    out, cache = relu_forward(x)
    assert out.shape == (0, 3) and relu_backward(out, cache).shape == (0, 3)


def test_relu_backward_refuses_a_dout_of_another_shape():
    out, cache = relu_forward(numpy.ones((2, 3), numpy.float32))
    with pytest.raises(ValueError, match=r"expected dout of shape \(2, 3\)"):
        relu_backward(numpy.ones((1, 3), numpy.float32), cache)
