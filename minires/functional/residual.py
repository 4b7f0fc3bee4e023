"""The residual add: out = branch + shortcut (docs/backward/residual.md).

Forward is a sum; its backward is the lesson of the whole project. Addition
passes its upstream gradient unchanged to *both* inputs:

    d(branch) = dout,   d(shortcut) = dout

and because the block's input x fanned out into both paths, the gradient of x
is the *sum* of what comes back through each of them (see BasicBlock.backward):

    dx = dx_through_branch + dx_through_shortcut

With an identity shortcut the second term is dout itself: the gradient reaches
earlier layers without passing through any weight.
"""
from ..backend import get_array_module
from ..parallel import chunks_of, map_chunks


def add_forward(branch, shortcut):
    """Returns (out, cache); the cache is None: addition needs nothing to go back.

    The sum is computed chunk by chunk over the batch on all CPU cores (NumPy
    adds on one core); on CuPy it is one operation.
    """
    xp = get_array_module(branch, shortcut)  # raises on NumPy/CuPy mixing
    if branch.shape != shortcut.shape:
        raise ValueError(
            f"residual add: branch shape {tuple(branch.shape)} != shortcut shape {tuple(shortcut.shape)}"
        )
    # out = branch + shortcut, one chunk of the batch at a time
    out = xp.empty(branch.shape, dtype=xp.result_type(branch, shortcut))
    map_chunks(lambda c: xp.add(branch[c], shortcut[c], out=out[c]), chunks_of(xp, out))
    return out, None


def add_backward(dout, cache=None):
    """Returns (dbranch, dshortcut): both are dout."""
    return dout, dout
