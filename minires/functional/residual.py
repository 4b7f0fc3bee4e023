"""The residual add: out = branch + shortcut (docs/backward/residual.md).

Forward is a sum; its backward is the lesson of the whole project. Addition
passes its upstream gradient unchanged to *both* inputs:

    d(branch) = dout,   d(shortcut) = dout

and because the block's input x fanned out into both paths, the gradient of x
is the *sum* of what comes back through each of them (see ResidualBlock.backward):

    dx = dx_through_branch + dx_through_shortcut

With an identity shortcut the second term is dout itself: the gradient reaches
earlier layers without passing through any weight.
"""
from ..backend import get_array_module


def check_add(branch, shortcut):
    """Raise a ValueError unless both inputs have one shape (no broadcasting)."""
    if branch.shape != shortcut.shape:
        raise ValueError(
            f"residual add: branch shape {tuple(branch.shape)} != shortcut shape {tuple(shortcut.shape)}"
        )


def add_forward(branch, shortcut):
    """Returns (out, cache); the cache is None: addition needs nothing to go back."""
    get_array_module(branch, shortcut)  # raises on NumPy/CuPy mixing
    check_add(branch, shortcut)
    return branch + shortcut, None


def add_backward(dout, cache=None):
    """Returns (dbranch, dshortcut): both are dout."""
    return dout, dout
