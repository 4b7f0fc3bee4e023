"""The seam: for each op, run the textbook's code or the engine's.

minires writes every op in ``minires/functional/`` (the textbook: plain,
vectorized, as short as its formula). Some ops have a second, fast version in
``minires/kernels/`` (the engine: chunks on all cores, scratch buffers, CUDA
kernels), with the same signature and contract. The layers, the optimizers
and the training loop call ops only through this module::

    from minires import ops
    out, cache = ops.conv2d_forward(x, w, b, stride, padding)

and this module is the one place that chooses which version that is:

    minires.set_kernels("fast")       # the default: the engine's version where there is one
    minires.set_kernels("textbook")   # every op from minires/functional/
    MINIRES_KERNELS=textbook python -m minires train ...
    python -m minires train --kernels textbook ...
"""
import contextlib
import os

from . import functional

#: Every op the layers, optimizers and training loop call, by name.
OPS = (
    "relu_forward", "relu_backward", "add_forward", "add_backward",
    "conv2d_forward", "conv2d_backward", "batchnorm2d_forward", "batchnorm2d_backward",
    "linear_forward", "linear_backward", "flatten_forward", "flatten_backward",
    "maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward", "avgpool2d_backward",
    "global_avgpool_forward", "global_avgpool_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
    "sgd_step", "zero_grads", "all_finite",
)

#: Ops that always run the textbook's code, even with "fast". Empty here; a
#: student copy (``minires assignment make``) lists its assigned parts, so that
#: training runs the student's own code.
TEXTBOOK_ONLY = ()

KINDS = ("fast", "textbook")
_kind = None


def set_kernels(kind):
    """Run the ops of ``kind`` ("fast" or "textbook") from now on; returns the previous kind."""
    global _kind
    if kind not in KINDS:
        raise ValueError(f"unknown kernels {kind!r}: expected 'fast' or 'textbook'")
    engine = {}
    if kind == "fast":
        from .kernels import ENGINE as engine
    for name in OPS:  # rebind this module's names: callers look them up at every call
        fast = engine.get(name) if name not in TEXTBOOK_ONLY else None
        globals()[name] = fast or getattr(functional, name)
    previous, _kind = _kind, kind
    return previous


def get_kernels():
    """The kind of ops running now: "fast" or "textbook"."""
    return _kind


@contextlib.contextmanager
def kernels(kind):
    """``with ops.kernels("textbook"): ...`` runs the block with ``kind``, then restores."""
    previous = set_kernels(kind)
    try:
        yield
    finally:
        set_kernels(previous)


def implementation(name):
    """The function that runs op ``name`` now (its module says which tier it is)."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")
    return globals()[name]


try:
    set_kernels(os.environ.get("MINIRES_KERNELS", "").strip() or "fast")
except ValueError as err:
    raise ValueError(f"MINIRES_KERNELS: {err}") from None
