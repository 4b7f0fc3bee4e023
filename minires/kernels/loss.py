"""Engine softmax cross-entropy: on a GPU one kernel launch each way
(kernels/cuda.py) instead of one per xp operation; on the CPU the textbook's code.
Same contract as minires.functional.loss.
"""
import numpy

from ..backend import get_array_module
from ..functional import loss as textbook
from . import cuda


def softmax_cross_entropy_forward(logits, labels):
    """Returns (loss, (probs, labels)), as the textbook."""
    xp = get_array_module(logits, labels)
    if xp is not numpy and labels.dtype == numpy.int64 and labels.size:
        textbook.check_logits(logits, labels)
        return cuda.softmax_cross_entropy_forward(logits, labels)
    return textbook.softmax_cross_entropy_forward(logits, labels)


def softmax_cross_entropy_backward(dloss, cache):
    """Returns dlogits = dloss * (p - onehot(y)) / N."""
    probs, labels = cache
    if get_array_module(probs) is not numpy and isinstance(dloss, (int, float)):
        return cuda.softmax_cross_entropy_backward(dloss, probs, labels)
    return textbook.softmax_cross_entropy_backward(dloss, cache)
