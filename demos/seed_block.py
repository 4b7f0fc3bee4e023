"""The example minires started from: one residual block, 3 -> 64 channels.

    H(x) = F(x) + W_s x
    F(x) = bn2(conv2(relu(bn1(conv1(x)))))   (3x3 convs with bias)
    W_s  = 1x1 conv + BN projection           (the shapes differ: 3 -> 64 channels)

applied to one 3x224x224 image; then the backward pass, by hand. Then it
checks itself:

1. a gradient check: the same block (same weights) in float64 on a small
   input, every backward gradient against centered differences, with a random
   upstream gradient; it prints PASS or FAIL and the worst relative error;
2. if PyTorch is installed, the same block in PyTorch with the same weights,
   both in float64: it prints whether the two agree.

Run:  python demos/seed_block.py                          (exit status 1 on a FAIL)
      python demos/seed_block.py --size 32               (a 32x32 image: quicker)
      MINIRES_BACKEND=cupy python demos/seed_block.py    (on a GPU)
"""
import argparse
import sys

import numpy

from minires import backend
from minires.gradcheck import numerical_gradient, rel_error
from minires.models import BasicBlock

#: float64 with h = 1e-6 leaves about 1e-9 of rounding in a centered difference;
#: a wrong backward (a missing term, a wrong sign) gives errors near 1.
BOUND = 1e-6
#: Conv biases that feed a training-mode BatchNorm: BN subtracts the channel
#: mean, bias included, so their true gradient is exactly 0 and a relative
#: error would compare rounding noise with rounding noise. They are checked
#: to be ~0 against the block's largest gradient instead.
ZERO_GRADIENT = ("conv1.bias", "conv2.bias")
#: minires and PyTorch in float64: the same sums in other orders agree to ~1e-13.
PARITY_BOUND = 1e-10


def gradient_check(block, num_checks=6, seed=0):
    """Check ``block``'s backward by centered differences; returns (verdict, errors).

    A float64 copy of the block (its weights loaded) runs on a 2x3x5x5 input: the
    weights do not depend on the image size, and the small input keeps each of
    the ~150 forwards cheap. For L = sum(G * block(x)) with a random G,
    dL/dtheta_i ~ (L(theta_i + h) - L(theta_i - h)) / 2h, on ``num_checks``
    random entries of the input and of every parameter.
    """
    small = type(block)(3, 64, stride=1, shortcut="B", bias=True).astype(numpy.float64)
    small.load_state_dict(block.state_dict())
    rng = numpy.random.default_rng(seed)
    x = backend.to_device(rng.standard_normal((2, 3, 5, 5)))
    saved = {k: v.copy() for k, v in small.named_buffers().items()}

    def loss():  # one forward in training mode, its running statistics left as they were
        out = small(x)
        for k, v in small.named_buffers().items():
            v[...] = saved[k]
        return float(backend.to_numpy(out * dout).sum())

    dout = backend.to_device(rng.standard_normal(small(x).shape))
    small.zero_grad()
    analytic = {"input": small.backward(dout), **small.named_grads()}
    analytic = {k: backend.to_numpy(g).astype(numpy.float64).reshape(-1) for k, g in analytic.items()}
    arrays = {"input": x, **small.named_parameters()}
    errors, zeros = {}, {}
    for name, array in arrays.items():
        picked = rng.choice(array.size, min(num_checks, array.size), replace=False)
        numeric = numerical_gradient(loss, array, indices=picked).reshape(-1)[picked]
        exact = analytic[name][picked]
        if name in ZERO_GRADIENT:
            zeros[name] = max(numpy.abs(numeric).max(), numpy.abs(exact).max())
        else:
            errors[name] = rel_error(exact, numeric)
    scale = max(numpy.abs(g).max() for g in analytic.values())
    for name, largest in zeros.items():
        errors[name] = largest / scale  # |gradient| relative to the largest: ~0 if the true value is 0
    verdict = "PASS" if max(errors.values()) < BOUND else "FAIL"
    return verdict, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description="One residual block, forward and backward by hand, checked.")
    parser.add_argument("--size", type=int, default=224, help="height and width of the image (default: 224)")
    size = parser.parse_args(argv).size
    backend.manual_seed(0)
    block = BasicBlock(3, 64, stride=1, shortcut="B", bias=True)
    x = numpy.random.default_rng(0).standard_normal((1, 3, size, size)).astype(numpy.float32)

    out = block(backend.to_device(x))  # on the active backend (NumPy unless MINIRES_BACKEND=cupy)
    print("block:", block)
    print("backend:     ", backend.backend_name())
    print("input shape: ", x.shape)
    print("output shape:", out.shape)

    # A random upstream gradient, as if a loss sat on top of the block.
    dout = numpy.random.default_rng(1).standard_normal(out.shape).astype(numpy.float32)
    dx = block.backward(backend.to_device(dout))
    print("\nbackward: every gradient, with its norm")
    for name, grad in {"input": dx, **block.named_grads()}.items():
        norm = numpy.linalg.norm(backend.to_numpy(grad).astype(numpy.float64))  # summed in float64
        print(f"  d {name:<26} {str(grad.shape):<20} {norm:.3e}")
    print("  (the conv biases' gradients are rounding noise: BatchNorm subtracts the\n"
          "   channel mean, bias included, so the true gradient of those biases is 0)")

    verdict, errors = gradient_check(block)
    print("\ngradient check: float64, centered differences, random upstream gradient")
    for name, error in errors.items():
        what = "|gradient| / largest" if name in ZERO_GRADIENT else "relative error"
        print(f"  d {name:<26} {what:<20} {error:.1e}" + ("  (true value 0)" if name in ZERO_GRADIENT else ""))
    worst = max(errors, key=errors.get)
    print(f"gradient check: {verdict} (worst relative error {errors[worst]:.1e}, d {worst}; bound {BOUND:.0e})")
    failed = verdict == "FAIL"

    try:
        import torch
    except ImportError:
        print("\nPyTorch not installed: parity with PyTorch not checked (pip install torch==2.13.0 to add it)")
        return 1 if failed else 0
    from minires.interop import state_dict_to_torch
    tnn = torch.nn

    class TorchBlock(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(3, 64, 3, 1, 1), tnn.BatchNorm2d(64)
            self.conv2, self.bn2 = tnn.Conv2d(64, 64, 3, 1, 1), tnn.BatchNorm2d(64)
            self.downsample = tnn.Sequential(tnn.Conv2d(3, 64, 1, bias=False), tnn.BatchNorm2d(64))

        def forward(self, x):
            branch = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(branch + self.downsample(x))

    # The comparison runs in float64. In float32 the two libraries round
    # differently (by about 1e-7 of each value), so the few of the 3.2 million
    # ReLU inputs that lie that close to 0 can fall on different sides of its
    # kink, and there the input gradient differs by a whole dout: a difference
    # of rounding, not of the math. In float64 that margin is 1e-16.
    block64 = BasicBlock(3, 64, stride=1, shortcut="B", bias=True).astype(numpy.float64)
    block64.load_state_dict(block.state_dict())  # the same weights
    out = backend.to_numpy(block64(backend.to_device(x.astype(numpy.float64))))
    dx = backend.to_numpy(block64.backward(backend.to_device(dout.astype(numpy.float64))))
    grads = {name: backend.to_numpy(g) for name, g in block64.named_grads().items()}
    twin = TorchBlock().double()
    twin.load_state_dict(state_dict_to_torch(block.state_dict()))  # same weights, same names
    tx = torch.tensor(x.astype(numpy.float64), requires_grad=True)
    tout = twin(tx)
    tout.backward(torch.tensor(dout.astype(numpy.float64)))
    torch_grads = {name: p.grad.numpy() for name, p in twin.named_parameters()}
    # Each difference is relative to the largest value it could be compared
    # with. One scale for all parameters: the conv biases feed straight into a
    # training-mode BN, so their true gradient is 0 and a per-array relative
    # error would compare rounding noise with rounding noise.
    scale = max(numpy.abs(g).max() for g in torch_grads.values())
    differences = {
        "output": numpy.abs(out - tout.detach().numpy()).max() / numpy.abs(out).max(),
        "input gradient": numpy.abs(dx - tx.grad.numpy()).max() / numpy.abs(dx).max(),
        "parameter gradients": max(numpy.abs(g - torch_grads[n]).max() for n, g in grads.items()) / scale,
    }
    print("\nPyTorch, same weights, float64: largest difference / largest value")
    for what, relative in differences.items():
        print(f"  {what:<20} {relative:.1e}")
    # float64 keeps about 16 digits; sums over 50,000 pixels lose a few of them
    if max(differences.values()) < PARITY_BOUND:
        print(f"parity with PyTorch: PASS, minires and PyTorch agree (all below {PARITY_BOUND:.0e})")
    else:
        print(f"parity with PyTorch: FAIL, minires and PyTorch DISAGREE (a difference above {PARITY_BOUND:.0e})")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
