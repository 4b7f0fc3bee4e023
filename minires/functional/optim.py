"""Whole-model array updates: the SGD step, zeroing gradients, the finite check.

Each takes lists of arrays (a model's parameters or gradients, in one order),
so that one call covers the model. SGD is ``torch.optim.SGD`` with dampening
0; for each parameter p with gradient grad, at step t = 1, 2, ...:

    g   = grad + weight_decay * p              L2 penalty, added to the gradient
    buf = g                       if t == 1    momentum buffer ("velocity")
    buf = momentum * buf + g      if t > 1
    g   = g + momentum * buf      if nesterov  (look ahead along buf)
    g   = buf                     otherwise    (when momentum > 0)
    p   = p - lr * g
"""
from ..backend import get_array_module


def sgd_step(params, grads, buffers, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """Update every ``params[k]`` in place from ``grads[k]``; returns the new buffers.

    ``buffers``: the list this function returned at the previous step (None,
    or None entries, where a parameter takes its first step: its buffer then
    starts as g). Returns None when momentum is 0 (plain SGD keeps no state).
    The model's gradients are never changed.
    """
    new_buffers = []
    for k, (p, grad) in enumerate(zip(params, grads)):
        g = grad + weight_decay * p if weight_decay else grad
        if momentum:
            buf = buffers[k] if buffers is not None else None
            if buf is None:
                buf = g.copy()
            else:
                buf *= momentum
                buf += g
            new_buffers.append(buf)
            g = g + momentum * buf if nesterov else buf
        p -= lr * g
    return new_buffers if momentum else None


def zero_grads(arrays):
    """Set every array to 0, in place (``backward`` adds into gradients)."""
    for a in arrays:
        a.fill(0)


def all_finite(arrays):
    """True unless some array holds a NaN or an infinity."""
    return all(bool(get_array_module(a).isfinite(a).all()) for a in arrays)
