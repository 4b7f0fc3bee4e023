"""Does a deeper ResNet cost more per layer on CuPy, and is Python's garbage collector the reason?

    PYTHONPATH=. python .ci/gpu-depth.py resnet110 resnet20

For each model named, the training step (batch 128, the benchmark's settings)
is timed over 15 steps four times: with the default gc, after ``gc.freeze()``,
with a generation-0 threshold of 50000, and with the default again. gc
callbacks count the collections of each generation, their time and what they
freed. A check for a GPU machine (.ci/gpu-check does not run it); its output on
an H200 is docs/figures/gpu-h200-2026-11-26/run5-depth-gc.log.
"""
import gc
import statistics
import sys
import time

from minires import backend, nn
from minires.bench import SGD_SETTINGS, _synthetic_batch
from minires.models import build_model
from minires.optim import SGD

VARIANTS = ("default", "freeze", "threshold 50000", "default again")
collections = {}  # generation -> [runs, seconds, objects freed]
_started = [0.0]


def on_gc(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    record = collections.setdefault(info["generation"], [0, 0.0, 0])
    record[0] += 1
    record[1] += time.perf_counter() - _started[0]
    record[2] += info["collected"]


def main(names):
    xp = backend.set_backend("cupy")
    sync = xp.cuda.Device().synchronize
    gc.callbacks.append(on_gc)
    default_threshold = gc.get_threshold()
    for name in names:
        backend.manual_seed(0)
        model = build_model(name, in_channels=3)
        loss_fn = nn.CrossEntropyLoss()
        opt = SGD(model, **SGD_SETTINGS)
        x, y = (backend.to_device(a) for a in _synthetic_batch(128, (3, 32, 32), 10))

        def step():
            loss_fn(model(x), y)
            opt.zero_grad()
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
            sync()

        for _ in range(3):
            step()
        for variant in VARIANTS:
            if variant == "freeze":
                gc.freeze()
            elif variant == "threshold 50000":
                gc.unfreeze()
                gc.set_threshold(50000, 10, 10)
            elif variant == "default again":
                gc.set_threshold(*default_threshold)
            collections.clear()
            times = []
            for _ in range(15):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            by_generation = {g: f"{runs} runs {seconds * 1e3:.1f} ms {freed} freed"
                             for g, (runs, seconds, freed) in sorted(collections.items())}
            print(f"{name} {variant}: step {statistics.median(times) * 1e3:.1f} ms; "
                  f"gc over 15 steps: {by_generation}; tracked {len(gc.get_objects())}, "
                  f"frozen {gc.get_freeze_count()}", flush=True)
        gc.unfreeze()
        gc.set_threshold(*default_threshold)


if __name__ == "__main__":
    main(sys.argv[1:])
