"""CrossEntropyLoss module: the loss op through the seam (minires/ops.py); math in minires/functional/loss.py."""
from .. import ops
from .module import Module


class CrossEntropyLoss(Module):
    """Softmax cross-entropy averaged over the batch.

    ``loss = fn(logits, labels)`` returns a Python float;
    ``fn.backward()`` returns dL/dlogits (the start of every backward pass).
    """

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def forward(self, logits, labels):
        self.check_input(logits, (None, None))
        if not hasattr(labels, "dtype"):
            raise TypeError(f"{self!r}: expected labels as an integer array, got {type(labels).__name__}")
        loss, self.cache = ops.softmax_cross_entropy_forward(logits, labels)
        return float(loss)

    def backward(self, dloss=1.0):
        return ops.softmax_cross_entropy_backward(dloss, self.pop_cache())
