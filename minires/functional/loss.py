"""Softmax cross-entropy, averaged over the batch (docs/backward/softmax-cross-entropy.md).

    p[n, k] = exp(z[n, k]) / sum_j exp(z[n, j])          (softmax of the logits z)
    L       = -(1/N) sum_n log p[n, y_n]

    dL/dz   = (p - onehot(y)) / N

Numerical stability: softmax does not change when a constant is subtracted
from a row, so we subtract the row maximum first (exp never overflows) and
compute log p with log-sum-exp (log never sees 0), which keeps the loss finite
for logits of any size.
"""
from ..backend import get_array_module, to_numpy


def check_logits(logits, labels):
    """Check shapes and label range; return the array module. Raises ValueError."""
    xp = get_array_module(logits, labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"softmax_cross_entropy: expected logits (N, K) and labels (N,), got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"softmax_cross_entropy: labels must be integers, got {labels.dtype}")
    if labels.size:
        host_labels = to_numpy(labels)
        low, high = int(host_labels.min()), int(host_labels.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(
                f"softmax_cross_entropy: labels must lie in [0, {logits.shape[1]}), got "
                f"values from {low} to {high}"
            )
    return xp


def softmax_cross_entropy_forward(logits, labels):
    """Returns (loss, cache); loss is a 0-d array, cache holds the probabilities."""
    xp = check_logits(logits, labels)
    # BEGIN ASSIGNMENT softmax_cross_entropy_forward
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(logits.shape[0])
    loss = -log_probs[rows, labels].mean()
    return loss, (xp.exp(log_probs), labels)
    # END ASSIGNMENT softmax_cross_entropy_forward


def softmax_cross_entropy_backward(dloss, cache):
    """Returns dlogits = dloss * (p - onehot(y)) / N."""
    # BEGIN ASSIGNMENT softmax_cross_entropy_backward
    probs, labels = cache
    xp = get_array_module(probs)
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[xp.arange(n), labels] -= 1
    dlogits *= dloss / n
    return dlogits
    # END ASSIGNMENT softmax_cross_entropy_backward


def softmax_cross_entropy_forward_naive(logits, labels):
    """Reference forward: one example at a time, straight from the definition."""
    xp = check_logits(logits, labels)
    n = logits.shape[0]
    probs = xp.empty_like(logits)
    total = 0.0
    for i in range(n):
        z = logits[i] - logits[i].max()
        probs[i] = xp.exp(z) / xp.exp(z).sum()
        total += -xp.log(probs[i, labels[i]])
    return total / n, (probs, labels)
