"""Engine residual add: the sum chunk by chunk over the batch on all CPU cores
(NumPy adds on one core); on CuPy one operation. Same contract as
minires.functional.residual.add_forward.
"""
from ..backend import get_array_module
from ..functional.residual import check_add
from .parallel import chunks_of, map_chunks


def add_forward(branch, shortcut):
    """Returns (out, None), out = branch + shortcut."""
    xp = get_array_module(branch, shortcut)  # raises on NumPy/CuPy mixing
    check_add(branch, shortcut)
    out = xp.empty(branch.shape, dtype=xp.result_type(branch, shortcut))
    map_chunks(lambda c: xp.add(branch[c], shortcut[c], out=out[c]), chunks_of(xp, out))
    return out, None
