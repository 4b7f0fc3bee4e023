"""Residual and plain blocks (He et al. 2016), the heart of minires.

BasicBlock:   out = relu( bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x) )
Bottleneck:   the same with 1x1 -> 3x3 -> 1x1 convs (expansion 4)
PlainBlock:   BasicBlock without the "+ shortcut(x)"

The backward of a residual block is where the project's lesson lives: x feeds
both the branch and the shortcut, so dL/dx is the *sum* of the two gradients.
With an identity shortcut the second term is the upstream gradient itself, so
it reaches earlier layers without passing through any weight
(docs/backward/residual.md).
"""
from .. import nn, ops
from ..backend import get_array_module


class ShortcutA(nn.Module):
    """Option A shortcut (He et al. 2016, CIFAR): parameter-free.

    Subsample x by ``stride`` and append zero channels up to ``out_channels``:
        out[:, :C_in] = x[:, :, ::s, ::s],   out[:, C_in:] = 0
    Backward keeps the gradient of the first C_in channels and scatters it
    back to the sampled positions (the skipped positions get 0).
    """

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        xp = get_array_module(x)
        s = self.stride
        sampled = x[:, :, ::s, ::s]
        n, c, h, w = sampled.shape
        out = xp.zeros((n, self.out_channels, h, w), dtype=x.dtype)
        out[:, :c] = sampled
        self.cache = x.shape
        return out

    def backward(self, dout):
        x_shape = self.pop_cache()
        s = self.stride
        dx = get_array_module(dout).zeros(x_shape, dtype=dout.dtype)
        dx[:, :, ::s, ::s] = dout[:, : self.in_channels]  # the padded channels had no input
        return dx

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def projection(in_channels, out_channels, stride):
    """Option B shortcut: 1x1 conv + BN, named ``downsample.0`` / ``downsample.1`` as torchvision."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResidualBlock(nn.Module):
    """out = relu(branch(x) + shortcut(x)). Subclasses build ``self.branch`` (a list of
    layers, in order), ``self.downsample`` (None for identity) and ``self.relu``."""

    def forward(self, x):
        out = x
        for layer in self.branch:
            out = layer(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        out, _ = ops.add_forward(out, shortcut)
        return self.relu(out)

    def backward(self, dout):
        # BEGIN ASSIGNMENT residual_block_backward
        d = self.relu.backward(dout)
        d_branch, d_shortcut = ops.add_backward(d)  # the addition copies d to both inputs
        for layer in reversed(self.branch):
            d_branch = layer.backward(d_branch)
        if self.downsample is not None:
            d_shortcut = self.downsample.backward(d_shortcut)
        # x fanned out into the branch and the shortcut, so their gradients add.
        # This sum is why deep ResNets train: d_shortcut reaches x undiminished.
        return d_branch + d_shortcut
        # END ASSIGNMENT residual_block_backward


class BasicBlock(ResidualBlock):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    ``shortcut`` is used only where the shape changes (otherwise identity):
    "A" zero-pads (parameter-free), "B" projects with 1x1 conv + BN.
    """

    expansion = 1

    def __init__(self, in_channels, out_channels, stride=1, shortcut="B", bias=False):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None  # identity
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.downsample = ShortcutA(in_channels, out_channels, stride)
            else:
                self.downsample = projection(in_channels, out_channels, stride)
        self.relu = nn.ReLU()
        self.branch = [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2]

    def last_bn(self):
        """The BN that ends the branch (zeroed by ``zero_init_residual``)."""
        return self.bn2


class Bottleneck(ResidualBlock):
    """1x1 (reduce to ``planes``) -> 3x3 (carries the stride, as torchvision) ->
    1x1 (expand to 4*planes), each followed by BN; projection shortcut where the
    shape changes."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = projection(in_channels, out_channels, stride)
        self.relu = nn.ReLU()
        self.branch = [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2, self.relu2, self.conv3, self.bn3]

    def last_bn(self):
        return self.bn3


class PlainBlock(nn.Module):
    """BasicBlock's layers without the shortcut: out = relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride=1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.layers = [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2, self.relu]

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dout):
        # No shortcut: the only way back to x is through every layer's weights.
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout
