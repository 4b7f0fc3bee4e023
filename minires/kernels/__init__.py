"""The engine: fast versions of the textbook's ops (minires/functional/).

Every function here has the signature, the contract and the numbers (up to
float rounding) of the textbook op of the same name; tests/test_engine.py
checks each pair on many geometries. What makes them fast:

* conv.py, batchnorm.py, activation.py, residual.py: the batch in chunks on
  all CPU cores (parallel.py), per-thread scratch buffers, "same"
  convolutions without col2im;
* cuda.py: hand-written CUDA kernels, one launch per op on a GPU, and the
  multi-array launches of optim.py (zero_grad, the SGD step, the NaN check).

Nothing outside this folder and the seam (minires/ops.py) imports it.
"""
from . import activation, batchnorm, conv, loss, optim, residual

#: op name -> the engine's function, for the seam (minires/ops.py) to take in
#: place of the textbook's. Ops not listed here run the textbook's code.
ENGINE = {
    "relu_forward": activation.relu_forward,
    "relu_backward": activation.relu_backward,
    "add_forward": residual.add_forward,
    "conv2d_forward": conv.conv2d_forward,
    "conv2d_backward": conv.conv2d_backward,
    "batchnorm2d_forward": batchnorm.batchnorm2d_forward,
    "batchnorm2d_backward": batchnorm.batchnorm2d_backward,
    "softmax_cross_entropy_forward": loss.softmax_cross_entropy_forward,
    "softmax_cross_entropy_backward": loss.softmax_cross_entropy_backward,
    "sgd_step": optim.sgd_step,
    "zero_grads": optim.zero_grads,
    "all_finite": optim.all_finite,
}
