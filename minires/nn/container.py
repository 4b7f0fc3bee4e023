"""Sequential: run children in order forward, in reverse order backward."""
from .module import CacheError, Module


class Sequential(Module):
    """Children are named "0", "1", ... as in PyTorch (so keys read ``downsample.0.weight``)."""

    def __init__(self, *modules):
        super().__init__()
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __len__(self):
        return len(self.named_children())

    def __getitem__(self, i):
        return self.named_children()[i][1]

    def forward(self, x):
        for _, module in self.named_children():
            x = module(x)
        return x

    def backward(self, dout):
        # The chain rule, applied last layer first.
        try:
            for _, module in reversed(self.named_children()):
                dout = module.backward(dout)
        except CacheError as err:  # name the layer that has no cache, as forward errors do
            self._name_failing_layer(err)
            raise
        return dout
