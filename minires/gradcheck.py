"""Numerical gradient checks: the proof that a hand-written backward is right.

For a function y = f(x) and an upstream gradient G (= dL/dy), the scalar
L = sum(G * f(x)) has dL/dx = backward(G). We estimate it with centered
differences, one entry at a time:

    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / (2 h)       error O(h^2)

and compare with the analytic gradient by the relative error

    rel_error(a, b) = ||a - b|| / max(1e-8, ||a|| + ||b||)

Three habits make the check meaningful (docs/gradient-checking.md):
* float64 everywhere: with h = 1e-6 float32 rounding would swamp the signal;
* a *random* G, never all ones: with G = 1 BatchNorm's dx is exactly zero and
  any backward "passes";
* BatchNorm is checked in training mode (batch statistics live) while its
  running statistics are restored after every evaluation.
"""
import numpy

from . import backend


def rel_error(a, b):
    """Relative error between two arrays (or scalars), 0 when both are zero."""
    a = backend.to_numpy(a).astype(numpy.float64)
    b = backend.to_numpy(b).astype(numpy.float64)
    return float(numpy.linalg.norm(a - b) / max(1e-8, numpy.linalg.norm(a) + numpy.linalg.norm(b)))


def numerical_gradient(loss, x, h=1e-6, indices=None):
    """Centered-difference gradient of the scalar ``loss()`` w.r.t. array ``x``.

    ``x`` is perturbed in place (and restored). ``indices`` (flat positions)
    limits the work to a sample of entries; the others are left at 0.
    """
    grad = numpy.zeros(x.shape)
    flat_x = x.reshape(-1)  # a view: writing to it perturbs x
    positions = range(x.size) if indices is None else indices
    for i in positions:
        old = flat_x[i].item()
        flat_x[i] = old + h
        plus = loss()
        flat_x[i] = old - h
        minus = loss()
        flat_x[i] = old
        grad.reshape(-1)[i] = (plus - minus) / (2 * h)
    return grad


def check_gradients(forward, arrays, analytic, dout, h=1e-6, num_checks=None, seed=0):
    """Compare analytic gradients with centered differences.

    forward   -- callable returning the output, computed from ``arrays``
    arrays    -- dict name -> array that ``forward`` reads (perturbed in place)
    analytic  -- dict name -> the backward's gradient for that array
    dout      -- the upstream gradient (same shape as the output)
    num_checks -- if set, check only this many random entries per array

    Returns dict name -> relative error.
    """
    xp = backend.get_array_module(dout)

    def loss():
        return float(xp.sum(forward() * dout))

    sampler = numpy.random.default_rng(seed)
    errors = {}
    for name, x in arrays.items():
        indices = None
        if num_checks is not None and x.size > num_checks:
            indices = sampler.choice(x.size, num_checks, replace=False)
        numeric = numerical_gradient(loss, x, h, indices)
        exact = backend.to_numpy(analytic[name]).astype(numpy.float64)
        if indices is not None:
            numeric, exact = numeric.reshape(-1)[indices], exact.reshape(-1)[indices]
        errors[name] = rel_error(exact, numeric)
    return errors


def check_module(module, x, h=1e-6, num_checks=None, seed=0):
    """Gradient-check a module's input and every parameter, in float64.

    The module is cast to float64 and keeps its train/eval mode. Buffers
    (BatchNorm running stats) are saved and restored around every forward, so
    training-mode BatchNorm is checked with its batch statistics live and its
    running statistics held fixed.

    Returns dict: ``"input"`` and every parameter name -> relative error.
    """
    module.astype(numpy.float64)
    xp = backend.get_array_module(x)
    x = x.astype(numpy.float64)
    saved = {k: v.copy() for k, v in module.named_buffers().items()}

    def restore_buffers():
        for k, v in module.named_buffers().items():
            v[...] = saved[k]

    def forward():
        out = module(x)
        restore_buffers()
        return out

    out = forward()
    # A stream of its own: if dout equalled a seed-0 input x, BatchNorm's dx
    # would be ~0 (as with all ones) and the check meaningless.
    dout = xp.asarray(numpy.random.default_rng([seed, 0xD0]).standard_normal(numpy.shape(out)))
    module.zero_grad()
    dx = module.backward(dout)
    analytic = {"input": dx, **{k: g.copy() for k, g in module.named_grads().items()}}
    arrays = {"input": x, **module.named_parameters()}
    return check_gradients(forward, arrays, analytic, dout, h, num_checks, seed)
