#!/usr/bin/env python3
"""How well a NumPy training step keeps the CPU cores busy.

    PYTHONPATH=. python .ci/cpu-threads.py [--model resnet20] [--steps 12]

Every parallel part of the fast paths goes through
``minires.kernels.parallel.map_chunks``. This script wraps it (in the modules that
call it) and reports, per training step: the number of calls and chunks, the
wall time spent inside the calls, the sum of the threads' busy time in them
(so ``busy / (threads * wall)`` is how much of the cores the chunks use; the
rest is hand-over and waiting for the last chunk), and the time outside
them, which runs on one core (Python, the scalar work of each layer, the
ShortcutA copies, the residual blocks' gradient sums, the optimizer).
"""
import argparse
import threading
import time

from minires import backend, nn, parallel
from minires.bench import SGD_SETTINGS, _synthetic_batch
from minires.functional import activation, batchnorm, conv, residual
from minires.models import build_model
from minires.optim import SGD

CALLERS = (activation, batchnorm, conv, residual)  # the modules that import map_chunks


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="timed steps (after 2 untimed)")
    args = p.parse_args()

    totals = {"calls": 0, "chunks": 0, "wall": 0.0, "busy": 0.0}
    lock = threading.Lock()
    original = parallel.map_chunks

    def counted(fn, chunks):
        chunks = list(chunks)

        def timed(chunk):
            t0 = time.perf_counter()
            result = fn(chunk)
            with lock:
                totals["busy"] += time.perf_counter() - t0
            return result

        t0 = time.perf_counter()
        results = original(timed, chunks)
        totals["wall"] += time.perf_counter() - t0
        totals["calls"] += 1
        totals["chunks"] += len(chunks)
        return results

    for module in CALLERS:
        module.map_chunks = counted

    backend.manual_seed(0)
    model = build_model(args.model)
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model, **SGD_SETTINGS)
    x, y = _synthetic_batch(args.batch, (3, 32, 32), model.fc.out_features)

    def step():
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()

    for _ in range(2):
        step()
    for key in totals:
        totals[key] = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - t0) / args.steps * 1e3
    n, threads = args.steps, parallel.num_threads()
    wall, busy = totals["wall"] / n * 1e3, totals["busy"] / n * 1e3
    print(f"{args.model}, batch {args.batch}, {threads} threads, mean of {n} steps")
    print(f"step                      {per_step:8.1f} ms")
    print(f"inside map_chunks (wall)  {wall:8.1f} ms   {totals['calls'] / n:.0f} calls, "
          f"{totals['chunks'] / n:.0f} chunks")
    print(f"  threads busy in them    {busy:8.1f} ms   = {busy / (threads * wall):.2f} of {threads} cores")
    print(f"outside map_chunks        {per_step - wall:8.1f} ms   (one core)")


if __name__ == "__main__":
    main()
