#!/usr/bin/env python3
"""A/B of two variants of minires code in ONE process, alternating step by step.

    PYTHONPATH=. python .ci/ab-step.py variant.py [--pairs 20] [--model resnet20]

``variant.py`` defines ``use(name)``, which switches the code to variant "A"
(the baseline) or "B", typically by assigning a function in the module that
calls it. For example, to compare the residual add on one core (A) with the
chunked one of ``minires.functional.residual`` (B):

    import minires.models.blocks as blocks
    from minires.functional.residual import add_forward

    def plain(branch, shortcut):
        return branch + shortcut, None

    def use(name):
        blocks.add_forward = plain if name == "A" else add_forward

A training step on the 2-core machine moves by 5-15% from one step to the
next and more from one process to the next (``.ci/ab-bench`` compares whole
processes), so a change worth 1-3% is only seen this way: steps of A and B
in alternating order (A B, B A, ...), the ratio of each adjacent pair, and
the median of those ratios with its quartiles and the count of pairs where
B was faster.
"""
import argparse
import importlib.util
import time

import numpy

from minires import backend, nn
from minires.bench import SGD_SETTINGS, _synthetic_batch
from minires.models import build_model
from minires.optim import SGD


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", help="a Python file that defines use(name), name 'A' or 'B'")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("variant", args.variant)
    variant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variant)

    backend.manual_seed(0)
    model = build_model(args.model)
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model, **SGD_SETTINGS)
    x, y = _synthetic_batch(args.batch, (3, 32, 32), model.fc.out_features)

    def step(name):
        variant.use(name)
        t0 = time.perf_counter()
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        return time.perf_counter() - t0

    for name in "ABAB":  # warm-up: first calls, buffers
        step(name)
    times = {"A": [], "B": []}
    for i in range(args.pairs):
        for name in ("AB" if i % 2 == 0 else "BA"):
            times[name].append(step(name))
    a, b = numpy.array(times["A"]), numpy.array(times["B"])
    ratio = b / a
    q1, med, q3 = numpy.percentile(ratio, [25, 50, 75])
    print(f"A median {numpy.median(a) * 1e3:.1f} ms, B median {numpy.median(b) * 1e3:.1f} ms")
    print(f"B / A per pair: median {med:.3f} (quartiles {q1:.3f} to {q3:.3f}); "
          f"B faster in {(ratio < 1).sum()} of {len(ratio)} pairs")


if __name__ == "__main__":
    main()
