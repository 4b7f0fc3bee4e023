"""Where a ResNet-20 training step spends its time on CuPy: host (launching) or GPU.

Run by .ci/gpu-check. ``cupyx.profiler.benchmark`` reports, for each phase, the
host time of the call and the GPU time between events around it. A phase whose
GPU time is close to its host time is launch-bound (the GPU waits for Python);
one whose GPU time is larger is compute-bound.
"""
import sys

import numpy

from minires import backend, nn
from minires.bench import SGD_SETTINGS, _synthetic_batch
from minires.models import build_model
from minires.optim import SGD


def main(batch=128, repeat=30):
    from cupyx.profiler import benchmark

    xp = backend.set_backend("cupy")
    backend.manual_seed(0)
    model = build_model("resnet20", in_channels=3)
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model, **SGD_SETTINGS)  # the benchmark's step, batch and settings
    x, y = (backend.to_device(a) for a in _synthetic_batch(batch, (3, 32, 32), 10))

    logits = model(x)
    loss_fn(logits, y)
    dlogits = loss_fn.backward()

    def forward():
        model(x)

    def forward_backward():  # a backward needs its forward's caches
        model(x)
        model.zero_grad()
        model.backward(dlogits)

    def full_step():  # as in training: forward, loss (a host float), backward, step
        out = model(x)
        loss_fn(out, y)
        opt.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()

    print(f"{'phase':<12}{'host ms':>10}{'GPU ms':>10}   (median of {repeat})")
    for name, fn in [("forward", forward), ("fwd+bwd", forward_backward), ("optimizer", opt.step),
                     ("zero_grad", model.zero_grad), ("full step", full_step)]:
        r = benchmark(fn, n_repeat=repeat, n_warmup=3)
        cpu, gpu = numpy.median(r.cpu_times) * 1e3, numpy.median(r.gpu_times[0]) * 1e3
        print(f"{name:<12}{cpu:>10.2f}{gpu:>10.2f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
