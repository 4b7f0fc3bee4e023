"""Run a minires module and its PyTorch twin side by side (test helper).

Both get the same weights, the same input and the same random upstream
gradient; we compare outputs, input gradients, every parameter gradient and
every buffer (BatchNorm running stats) after each of several training steps.
"""
import numpy

from minires.gradcheck import rel_error
from minires.interop import state_dict_to_torch


def compare(module, torch_module, x, steps=1, seed=0):
    """Returns dict: quantity name -> worst relative error over ``steps`` steps."""
    import torch

    torch_dtype = torch.float64 if x.dtype == numpy.float64 else torch.float32
    torch_module.to(torch_dtype)
    torch_module.load_state_dict(state_dict_to_torch(module.state_dict()))
    torch_module.train(module.training)
    rng = numpy.random.default_rng(seed)
    worst = {}

    def record(name, a, b):
        worst[name] = max(worst.get(name, 0.0), rel_error(a, b))

    for _ in range(steps):
        out = module(x)
        dout = rng.standard_normal(out.shape).astype(x.dtype)
        module.zero_grad()
        dx = module.backward(dout)

        tx = torch.tensor(x, requires_grad=True)
        tout = torch_module(tx)
        torch_module.zero_grad()
        tout.backward(torch.tensor(dout))
        record("output", out, tout.detach().numpy())
        record("input grad", dx, tx.grad.numpy())
        torch_grads = {n: p.grad for n, p in torch_module.named_parameters()}
        for name, g in module.named_grads().items():
            record(name + " grad", g, torch_grads[name].numpy())
        torch_buffers = dict(torch_module.named_buffers())
        for name, b in module.named_buffers().items():
            record(name, b, torch_buffers[name].numpy())
    return worst
