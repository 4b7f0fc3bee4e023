"""The example minires started from: one residual block, 3 -> 64 channels.

    H(x) = F(x) + W_s x
    F(x) = bn2(conv2(relu(bn1(conv1(x)))))   (3x3 convs with bias)
    W_s  = 1x1 conv + BN projection           (the shapes differ: 3 -> 64 channels)

applied to one 3x224x224 image; then the backward pass, by hand; then, if
PyTorch is installed, the same block in PyTorch with the same weights.

Run:  python demos/seed_block.py
      MINIRES_BACKEND=cupy python demos/seed_block.py    (on a GPU)
"""
import numpy

from minires import backend
from minires.models import BasicBlock


def main():
    backend.manual_seed(0)
    block = BasicBlock(3, 64, stride=1, shortcut="B", bias=True)
    x = numpy.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(numpy.float32)

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

    try:
        import torch
    except ImportError:
        print("\n(PyTorch not installed: skipping the comparison)")
        return
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

    # the comparison runs on the host
    out, dx = backend.to_numpy(out), backend.to_numpy(dx)
    grads = {name: backend.to_numpy(g) for name, g in block.named_grads().items()}
    twin = TorchBlock()
    twin.load_state_dict(state_dict_to_torch(block.state_dict()))  # same weights, same names
    tx = torch.tensor(x, requires_grad=True)
    tout = twin(tx)
    tout.backward(torch.tensor(dout))
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
    print("\nPyTorch, same weights: largest difference / largest value")
    for what, relative in differences.items():
        print(f"  {what:<20} {relative:.1e}")
    # float32 keeps about 7 digits; sums over 50,000 pixels lose a few of them
    if max(differences.values()) < 1e-4:
        print("minires and PyTorch agree (to float32 rounding: all below 1e-4)")
    else:
        print("minires and PyTorch DISAGREE (a difference above 1e-4)")

if __name__ == "__main__":
    main()
