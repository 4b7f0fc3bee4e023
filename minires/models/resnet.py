"""ResNets and their plain twins (He et al. 2016).

CIFAR family (paper section 4.2), depth 6n+2: a 3x3 stem conv with 16 filters,
three stages of n blocks with 16/32/64 channels (stride 2 at the start of stages
2 and 3), global average pooling and a linear classifier.

ImageNet family: torchvision's layout and parameter names: 7x7 stride-2 stem,
3x3 max pool, four stages (64/128/256/512 planes), average pool, ``fc``.

A network is a chain: its child modules are assigned in the order data flows
through them, so forward runs them in that order and backward in reverse.
"""
from .. import nn
from ..nn.module import CacheError
from .blocks import BasicBlock, Bottleneck, PlainBlock, ResidualBlock


class ResNet(nn.Module):
    """A chain of layers; build one with the factories below (``resnet20()``, ``resnet18()``...)."""

    def layers(self):
        """The top-level layers, in the order data flows through them."""
        return [module for _, module in self.named_children()]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x

    def backward(self, dout, input_grad=True):
        """Backpropagate ``dout`` (dL/dlogits): every parameter's gradient is added
        into its ``grads``; returns dL/dx for the input images.

        ``input_grad=False`` returns None instead, and the first convolution skips
        computing dx, the larger part of its backward: training needs only the
        parameters' gradients (PyTorch skips it too, for images that do not
        require grad).
        """
        layers = self.layers()
        stem = layers[0]  # the first conv, which reads the images
        stem.input_grad = input_grad  # (for this pass only: see finally)
        try:
            for layer in reversed(layers):
                dout = layer.backward(dout)
        except CacheError as err:  # a layer without its forward's cache: name it ("fc: Linear.backward ...")
            self._name_failing_layer(err)
            raise
        finally:
            stem.input_grad = True
        return dout if input_grad else None

    def blocks(self):
        """Every residual/plain block, from input to output."""
        return [m for _, m in self.named_modules() if isinstance(m, (ResidualBlock, PlainBlock))]

    def _zero_init_residual(self):
        """Start each residual branch at zero (gamma = 0 in its last BN), so every
        block begins as the identity (Goyal et al. 2017; torchvision's option)."""
        for block in self.blocks():
            if isinstance(block, ResidualBlock):
                block.last_bn().params["weight"].fill(0)


def _stage(make_block, in_channels, channels, n, stride):
    """n blocks; the first changes stride/channels, the rest keep them."""
    blocks = [make_block(in_channels, channels, stride)]
    blocks += [make_block(channels, channels, 1) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class CifarResNet(ResNet):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2).

    ``plain=True`` builds the plain twin: the same layers with no shortcuts.
    """

    def __init__(self, n, num_classes=10, in_channels=3, shortcut="A", plain=False,
                 zero_init_residual=False, widths=(16, 32, 64)):
        super().__init__()
        if plain:
            def make_block(cin, cout, stride):
                return PlainBlock(cin, cout, stride)
        else:
            def make_block(cin, cout, stride):
                return BasicBlock(cin, cout, stride, shortcut=shortcut)
        self.depth, self.plain = 6 * n + 2, plain
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = _stage(make_block, widths[0], widths[0], n, 1)
        self.layer2 = _stage(make_block, widths[0], widths[1], n, 2)
        self.layer3 = _stage(make_block, widths[1], widths[2], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[2], num_classes)
        if zero_init_residual:
            self._zero_init_residual()


class ImageNetResNet(ResNet):
    """torchvision's ResNet layout; ``block`` is BasicBlock, Bottleneck or PlainBlock."""

    def __init__(self, block, counts, num_classes=1000, in_channels=3, zero_init_residual=False):
        super().__init__()
        expansion = block.expansion
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
            stage = [block(in_ch, planes, 1 if i == 0 else 2)]
            in_ch = planes * expansion
            stage += [block(in_ch, planes, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512 * expansion, num_classes)
        if zero_init_residual:
            self._zero_init_residual()


# --- factories ------------------------------------------------------------------------

def _cifar(depth, plain):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    prefix = "plain" if plain else "resnet"

    if plain:
        def factory(num_classes=10, in_channels=3, **kw):
            return CifarResNet(n, num_classes, in_channels, plain=True, **kw)
    else:
        def factory(num_classes=10, in_channels=3, shortcut="A", **kw):
            return CifarResNet(n, num_classes, in_channels, shortcut, **kw)
    factory.__name__ = f"{prefix}{depth}"
    factory.__doc__ = f"{'Plain' if plain else 'Residual'} CIFAR network of depth {depth} (n={n})."
    return factory


resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = (
    _cifar(d, False) for d in (20, 32, 44, 56, 110, 1202))
plain20, plain32, plain44, plain56, plain110 = (_cifar(d, True) for d in (20, 32, 44, 56, 110))


def _imagenet(name, block, counts):
    def factory(num_classes=1000, in_channels=3, **kw):
        return ImageNetResNet(block, counts, num_classes, in_channels, **kw)
    factory.__name__ = name
    factory.__doc__ = f"{name} with torchvision's layout and state_dict names."
    return factory


resnet18 = _imagenet("resnet18", BasicBlock, (2, 2, 2, 2))
resnet34 = _imagenet("resnet34", BasicBlock, (3, 4, 6, 3))
resnet50 = _imagenet("resnet50", Bottleneck, (3, 4, 6, 3))
resnet101 = _imagenet("resnet101", Bottleneck, (3, 4, 23, 3))
resnet152 = _imagenet("resnet152", Bottleneck, (3, 8, 36, 3))
plain18 = _imagenet("plain18", PlainBlock, (2, 2, 2, 2))
plain34 = _imagenet("plain34", PlainBlock, (3, 4, 6, 3))

CIFAR_MODELS = {f.__name__: f for f in (
    resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202,
    plain20, plain32, plain44, plain56, plain110)}
IMAGENET_MODELS = {f.__name__: f for f in (
    resnet18, resnet34, resnet50, resnet101, resnet152, plain18, plain34)}
MODELS = {**CIFAR_MODELS, **IMAGENET_MODELS}


def build_model(name, **kw):
    """Build a model by name (``"resnet20"``, ``"plain56"``, ``"resnet18"``...).

    Keyword arguments go to the factory; ``shortcut`` is ignored by plain
    networks and ImageNet ResNets (which always project), so one call works
    for every name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if name.startswith("plain") or name in IMAGENET_MODELS:
        kw.pop("shortcut", None)
    return MODELS[name](**kw)
