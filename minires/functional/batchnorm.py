"""Batch normalization over the channels of NCHW arrays (docs/backward/batchnorm.md).

Training mode, per channel c, over the M = N*H*W values of that channel:

    mean    = (1/M) sum x
    var     = (1/M) sum (x - mean)^2            biased: this is what normalizes
    inv_std = 1 / sqrt(var + eps)
    x_hat   = (x - mean) * inv_std
    out     = gamma * x_hat + beta

    running_mean <- (1 - momentum) running_mean + momentum mean
    running_var  <- (1 - momentum) running_var  + momentum var * M / (M - 1)   (unbiased)

Eval mode uses running_mean / running_var in place of the batch statistics,
so it is a fixed per-channel affine map.

Backward (training), closed form, with dbeta = sum dout and dgamma = sum dout*x_hat:

    dx = gamma * inv_std / M * (M * dout - dbeta - x_hat * dgamma)

The two sums are how the gradient reaches x through mean and var: every x of a
channel influences every output of that channel. In eval mode mean and var
are constants, so BN is a per-channel affine map: dx = gamma * inv_std * dout.

``batchnorm2d_forward_naive`` / ``batchnorm2d_backward_naive`` below go one
channel at a time and through the graph node by node; they are the reference
the closed form is tested against.
"""
from ..backend import get_array_module

_AXES = (0, 2, 3)  # reduce over batch and space, keep channels


def _per_channel(v):
    """(C,) -> (1, C, 1, 1), to broadcast against NCHW."""
    return v.reshape(1, -1, 1, 1)


def check_batchnorm(x, gamma, training):
    """Raise a ValueError unless x is (N, C, H, W) with gamma's C channels, and
    (in training) holds more than one value per channel."""
    if x.ndim != 4 or gamma.ndim != 1 or x.shape[1] != gamma.shape[0]:
        raise ValueError(
            f"batchnorm2d: expected x of shape (N, {gamma.shape[0]}, H, W) for "
            f"gamma of shape {tuple(gamma.shape)}, got x of shape {tuple(x.shape)}"
        )
    if training and x.size // x.shape[1] < 2:
        raise ValueError(
            f"batchnorm2d: training needs more than one value per channel, got x of shape {tuple(x.shape)}"
        )


def update_running_stats(running_mean, running_var, mean, var, momentum, m):
    """running <- (1 - momentum) running + momentum batch, in place; var made unbiased (PyTorch)."""
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += (momentum * m / (m - 1)) * var


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var,
                        momentum=0.1, eps=1e-5, training=True, num_batches_tracked=None):
    """Normalize x (N, C, H, W) per channel; returns (out, cache).

    In training mode ``running_mean`` / ``running_var`` (C,) are updated in
    place, and so is ``num_batches_tracked`` if given (a 0-d integer array, +1).
    The cache is ``(x_hat, gamma, inv_std, training)``, x_hat shaped like x.
    """
    xp = get_array_module(x, gamma, beta, running_mean, running_var)
    check_batchnorm(x, gamma, training)
    if training:
        mean = x.mean(axis=_AXES)
        var = x.var(axis=_AXES)  # biased: (1/M) sum (x - mean)^2
        update_running_stats(running_mean, running_var, mean, var, momentum, x.size // x.shape[1])
        if num_batches_tracked is not None:
            num_batches_tracked[...] += 1  # in place: the caller's 0-d array
    else:
        mean, var = running_mean, running_var
    inv_std = 1 / xp.sqrt(var + eps)
    x_hat = (x - _per_channel(mean)) * _per_channel(inv_std)
    out = _per_channel(gamma) * x_hat + _per_channel(beta)
    return out, (x_hat, gamma, inv_std, training)


def batchnorm2d_backward(dout, cache):
    """Closed-form backward; returns (dx, dgamma, dbeta)."""
    # BEGIN ASSIGNMENT batchnorm2d_backward
    x_hat, gamma, inv_std, training = cache
    dbeta = dout.sum(axis=_AXES)
    dgamma = (dout * x_hat).sum(axis=_AXES)
    if not training:  # mean and var are constants: an affine map
        return dout * _per_channel(gamma * inv_std), dgamma, dbeta
    m = dout.size // dout.shape[1]
    dx = _per_channel(gamma * inv_std / m) * (m * dout - _per_channel(dbeta) - x_hat * _per_channel(dgamma))
    return dx, dgamma, dbeta
    # END ASSIGNMENT batchnorm2d_backward


def batchnorm2d_forward_naive(x, gamma, beta, running_mean, running_var,
                              momentum=0.1, eps=1e-5, training=True):
    """Reference forward: one channel at a time, each step of the formula spelled out."""
    xp = get_array_module(x, gamma)
    check_batchnorm(x, gamma, training)
    out = xp.empty_like(x)
    x_hat = xp.empty_like(x)
    inv_std = xp.empty_like(gamma)
    for c in range(x.shape[1]):
        values = x[:, c]
        m = values.size
        if training:
            mean = values.sum() / m
            var = ((values - mean) ** 2).sum() / m
            running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean
            running_var[c] = (1 - momentum) * running_var[c] + momentum * var * m / (m - 1)
        else:
            mean, var = running_mean[c], running_var[c]
        inv_std[c] = 1 / xp.sqrt(var + eps)
        x_hat[:, c] = (values - mean) * inv_std[c]
        out[:, c] = gamma[c] * x_hat[:, c] + beta[c]
    return out, (x_hat, gamma, inv_std, training)


def batchnorm2d_backward_naive(dout, cache):
    """Reference backward: walk the computational graph of the forward step by step.

    forward graph (training):  xc = x - mean;  var = mean(xc^2);  std = sqrt(var + eps);
                               inv_std = 1/std;  x_hat = xc * inv_std;  out = gamma*x_hat + beta
    Each line below is the chain rule through one node, in reverse order.
    """
    x_hat, gamma, inv_std, training = cache
    dbeta = dout.sum(axis=_AXES)
    dgamma = (dout * x_hat).sum(axis=_AXES)
    dx_hat = dout * _per_channel(gamma)
    if not training:
        return dx_hat * _per_channel(inv_std), dgamma, dbeta
    m = dout.size // dout.shape[1]
    std = 1 / inv_std
    xc = x_hat * _per_channel(std)                       # recover the centred input
    dinv_std = (dx_hat * xc).sum(axis=_AXES)             # x_hat = xc * inv_std
    dxc = dx_hat * _per_channel(inv_std)                 #   (path 1 into xc)
    dstd = -dinv_std / std**2                            # inv_std = 1 / std
    dvar = 0.5 * dstd / std                              # std = sqrt(var + eps)
    dxc = dxc + 2 * xc * _per_channel(dvar) / m          # var = mean(xc^2)  (path 2 into xc)
    dmean = -dxc.sum(axis=_AXES)                         # xc = x - mean
    dx = dxc + _per_channel(dmean) / m                   # mean = mean(x)
    return dx, dgamma, dbeta
