"""BatchNorm2d module: the batchnorm2d op through the seam (minires/ops.py); math in minires/functional/batchnorm.py."""
import numpy

from .. import backend, ops
from .. import ops
from . import init
from .module import Module, check_sizes


class BatchNorm2d(Module):
    """Per-channel batch normalization with PyTorch's numbers.

    Training: normalize with the batch's biased variance, update the running
    stats with momentum 0.1 and the unbiased variance. Eval: use the running stats.
    Parameters ``weight`` (gamma, init 1) and ``bias`` (beta, init 0); buffers
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (torchvision's names).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        check_sizes("BatchNorm2d", num_features=num_features)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.add_param("weight", init.constant((num_features,), 1.0))
        self.add_param("bias", init.constant((num_features,), 0.0))
        self.buffers["running_mean"] = init.constant((num_features,), 0.0)
        self.buffers["running_var"] = init.constant((num_features,), 1.0)
        self.buffers["num_batches_tracked"] = backend.to_device(numpy.zeros((), dtype=numpy.int64))

    def forward(self, x):
        gamma = self.params["weight"]
        self.check_input(x, (None, self.num_features, None, None), gamma.dtype)
        out, self.cache = ops.batchnorm2d_forward(
            x, gamma, self.params["bias"], self.buffers["running_mean"], self.buffers["running_var"],
            self.momentum, self.eps, self.training, self.buffers["num_batches_tracked"])
        return out

    def backward(self, dout):
        cache = self.pop_cache()
        self.check_dout(dout, cache[0].shape)  # cache[0] is x_hat, shaped like the output
        dx, dgamma, dbeta = ops.batchnorm2d_backward(dout, cache)
        self.grads["weight"] += dgamma
        self.grads["bias"] += dbeta
        return dx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
