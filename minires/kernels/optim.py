"""Engine whole-model updates: on a GPU each is one kernel launch for all the
arrays of a model (kernels/cuda.py's ``*_many``), where array by array would
be one launch or more per array. Same contracts as minires.functional.optim.
"""
import numpy

from ..backend import get_array_module
from ..functional import optim as textbook
from . import cuda


def sgd_step(params, grads, buffers, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """:func:`minires.functional.optim.sgd_step`; with momentum on a GPU, one launch."""
    params, grads = list(params), list(grads)
    first = buffers is None or all(b is None for b in buffers)
    one_launch = (momentum and cuda.fits_one_launch(params + grads)
                  and (first or (all(b is not None for b in buffers) and cuda.fits_one_launch(buffers)))
                  and len({id(p) for p in params}) == len(params))  # (a shared array: one by one)
    xp = get_array_module(*params) if params else numpy
    if not one_launch and momentum and xp is not numpy:  # a GPU, array by array: one launch each
        new_buffers = []
        for k, (p, grad) in enumerate(zip(params, grads)):
            buf = buffers[k] if buffers is not None else None
            first = buf is None
            buf = xp.empty_like(p) if first else buf  # (first: the kernel sets it to g)
            cuda.sgd_momentum_step(p, grad, buf, lr, momentum, weight_decay, nesterov, first)
            new_buffers.append(buf)
        return new_buffers
    if not one_launch:
        return textbook.sgd_step(params, grads, buffers, lr, momentum, weight_decay, nesterov)
    new_buffers = [xp.empty_like(p) for p in params] if first else list(buffers)  # first: set to g
    cuda.sgd_momentum_step_many(params, grads, new_buffers, lr, momentum, weight_decay, nesterov, first)
    return new_buffers


def zero_grads(arrays):
    """Set every array to 0; on a GPU in one launch."""
    arrays = list(arrays)
    if cuda.fits_one_launch(arrays):
        cuda.zero_many(arrays)
    else:
        textbook.zero_grads(arrays)


def all_finite(arrays):
    """True unless some array holds a NaN or an infinity.

    Checked once per training step, so first cheaply: on a GPU one kernel
    checks all the arrays and one flag comes back (one sync, not one per
    array); on the CPU a NaN or inf anywhere makes an array's sum NaN or inf.
    Only when that says "maybe" does the exact scan run (a sum can overflow
    with finite entries).
    """
    arrays = list(arrays)
    if not arrays:
        return True
    xp = get_array_module(*arrays)
    if cuda.fits_one_launch(arrays):
        if not int(cuda.flag_nonfinite_many(arrays)[0]):
            return True
    elif xp is numpy:
        with numpy.errstate(over="ignore", invalid="ignore"):
            sums = [a.sum() for a in arrays]
        if bool(numpy.isfinite(sums).all()):
            return True
    return textbook.all_finite(arrays)
