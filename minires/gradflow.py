"""Gradient flow: how large is the gradient at each depth of a network?

During ``model.backward`` we record, without touching the numbers backward
computes:

* for every weight layer (Conv2d, Linear) the norm of its weight gradient
  ``||dL/dW||`` (Frobenius norm: sqrt of the sum of squares);
* for every block (residual or plain) the norm of the gradient reaching its
  input, ``||dL/dx_l||`` -- what the block hands back to the layers below it.

Both lists are ordered from the input to the output of the network. In a plain
network ``dL/dx_l`` is a product of one Jacobian per layer above ``l``; in a
residual network every block adds its shortcut's gradient
(the sum of the branch's and the shortcut's gradients in ``ResidualBlock.backward``), so
``dL/dx_l = dL/dx_{l+1} + (branch term)`` and the gradient cannot fade away.
docs/gradient-flow.md shows the figures this module produces.

How the recording works: a module's ``backward`` is looked up on the instance
first, so :func:`record_gradients` sets an instance attribute ``backward`` that
calls the class's method, notes a norm, and returns the method's result
untouched. Leaving the ``with`` block deletes the attributes again::

    with record_gradients(model) as rec:
        loss = loss_fn(model(x), y)
        model.zero_grad()
        model.backward(loss_fn.backward())
    rec.layers, rec.grad_norms          # ['conv1', 'layer1.0.conv1', ..., 'fc'], [...]
    rec.blocks, rec.input_grad_norms    # ['layer1.0', ...], [...]

``python -m minires gradflow`` (see :func:`add_parser`) runs this on plain-N
and ResNet-N at initialization and writes ``gradflow.json`` and figures.
"""
import json
import math
import os
import time
from contextlib import contextmanager

import numpy

from . import backend, nn
from .models.blocks import PlainBlock, ResidualBlock


# --- which modules are recorded ----------------------------------------------------

def weight_layers(model):
    """``[(name, module)]`` for every Conv2d and Linear, in the order the model
    defines them (for the CIFAR networks: input to output)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def blocks(model):
    """``[(name, block)]`` for every residual or plain block, input to output."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (ResidualBlock, PlainBlock))]


def _norm(a):
    """Euclidean norm of a whole array as a Python float, accumulated in float64
    (a float32 sum of squares of 10^5 entries would lose digits)."""
    xp = backend.get_array_module(a)
    return float(xp.linalg.norm(a.astype(xp.float64).ravel()))


# --- recording ---------------------------------------------------------------------

class GradientRecorder:
    """Holds the norms of the latest backward pass, by module name.

    ``layers`` / ``blocks`` are the names in input-to-output order;
    ``grad_norms`` / ``input_grad_norms`` the matching values (NaN for a module
    whose backward has not run yet). Each backward overwrites the previous
    values, so in a training loop read them after every ``model.backward``.
    """

    def __init__(self, layer_names, block_names):
        self.layers = list(layer_names)
        self.blocks = list(block_names)
        self._weight = {}
        self._input = {}

    @property
    def grad_norms(self):
        """``||dL/dW||`` per weight layer (after its backward; equal to this pass's
        dL/dW when ``zero_grad`` ran before it, as in every training step)."""
        return [self._weight.get(name, math.nan) for name in self.layers]

    @property
    def input_grad_norms(self):
        """``||dL/dx||`` at the input of each block."""
        return [self._input.get(name, math.nan) for name in self.blocks]

    def as_dict(self):
        return {"layers": self.layers, "grad_norms": self.grad_norms,
                "blocks": self.blocks, "input_grad_norms": self.input_grad_norms}


@contextmanager
def record_gradients(model):
    """Record per-layer weight-gradient norms and per-block input-gradient norms
    during every ``backward`` inside the ``with`` block; yields a
    :class:`GradientRecorder`. The recording runs as hooks (``Module.hooks``)
    around the layers' and blocks' backward, removed on exit, even after an
    exception; what backward returns is unchanged."""
    layers, block_list = weight_layers(model), blocks(model)
    rec = GradientRecorder([n for n, _ in layers], [n for n, _ in block_list])
    weight_layer_names = {n for n, _ in layers}

    def record(name, m, backward, dout):
        dx = backward(dout)
        if name in weight_layer_names:
            rec._weight[name] = _norm(m.grads["weight"])  # after backward added into it
        else:
            rec._input[name] = _norm(dx)  # the gradient at the block's input
        return dx

    with model.hooks(backward=record, modules=layers + block_list):
        yield rec


# --- a network without BatchNorm -------------------------------------------------

class Identity(nn.Module):
    """out = x, dx = dout: stands in for a removed layer."""

    def forward(self, x):
        self.cache = True
        return x

    def backward(self, dout):
        self.pop_cache()
        return dout


def remove_batchnorm(model, conv_bias=True):
    """Replace every BatchNorm2d of ``model`` by an :class:`Identity`, in place;
    returns the model.

    ``conv_bias``: give every bias-free conv a bias, initialized as PyTorch's
    ``nn.Conv2d`` does (uniform in +-1/sqrt(fan_in)). A conv followed by BN has
    no bias because BN's beta does its job; once BN is gone the conv gets it
    back, as ``nn.Conv2d``'s default ``bias=True`` would. (It matters: see
    docs/gradient-flow.md.)

    Blocks also keep their layers in plain lists (``self.branch``,
    ``self.layers``) that forward/backward walk, so the same Identity object
    goes into the attribute and into the list. Without BatchNorm only the He
    initialization keeps activations in scale.
    """
    from .nn import init

    if conv_bias:
        for _, conv in weight_layers(model):
            if isinstance(conv, nn.Conv2d) and "bias" not in conv.params:
                kh, kw = conv.kernel_size
                w = conv.params["weight"]
                bound = 1 / math.sqrt(conv.in_channels * kh * kw)
                conv.add_param("bias", init.uniform((conv.out_channels,), bound, dtype=w.dtype))
    for _, module in list(model.named_modules()):
        owned = vars(module)
        new = {id(v): Identity() for v in owned.values() if isinstance(v, nn.BatchNorm2d)}
        for attr, value in list(owned.items()):
            if isinstance(value, nn.BatchNorm2d):
                setattr(module, attr, new[id(value)])
            elif isinstance(value, list):
                setattr(module, attr, [new.get(id(v), v) for v in value])
    left = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    left += [f"{name}.{attr}" for name, m in model.named_modules() for attr, v in vars(m).items()
             if isinstance(v, list) and any(isinstance(e, nn.BatchNorm2d) for e in v)]
    if left:
        raise RuntimeError(f"remove_batchnorm: could not replace {left}")
    return model


# --- the experiment: one forward/backward at initialization -----------------------

def load_batch(batch_size, seed=0, data_dir=None, dataset="fashion-mnist", synthetic=False,
               dtype=numpy.float32, return_files=False):
    """A training batch, normalized as the DataLoader does; returns ``(x, y, source)``
    (with ``return_files``, also the files read: :func:`minires.data.load_dataset`).

    ``batch_size`` images drawn at random (seeded) from the training set, found
    (or downloaded) as ``train`` finds it. Data that cannot be found is an error:
    the batch is standard-normal noise with random labels only when ``synthetic``
    is asked for, and then ``source`` says so in capitals (the figures and the
    JSON carry it).
    """
    from .data import DATASETS, load_dataset

    info = DATASETS[dataset]
    rng = numpy.random.default_rng(seed)
    if synthetic:
        x = rng.standard_normal((batch_size,) + info.image_shape).astype(numpy.float32)
        y = rng.integers(0, info.num_classes, size=batch_size)
        source = "SYNTHETIC batch (N(0,1) noise, random labels; requested)"
        files = []
    else:
        if data_dir is not None and not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory {data_dir!r} does not exist")
        (images, labels, _, _), files = load_dataset(dataset, data_dir, return_files=True)
        if not 1 <= batch_size <= len(labels):
            raise ValueError(f"batch must be in 1..{len(labels)}, got {batch_size}")
        idx = rng.choice(len(labels), size=batch_size, replace=False)
        mean = numpy.asarray(info.mean, numpy.float32).reshape(1, -1, 1, 1)
        std = numpy.asarray(info.std, numpy.float32).reshape(1, -1, 1, 1)
        x = ((images[idx].astype(numpy.float32) / 255 - mean) / std).astype(numpy.float32)
        y = labels[idx]
        source = f"{dataset} training images (random batch of {batch_size}, seed {seed})"
        files = [f for f in files if f["role"] in ("train images", "train labels")]
    x = x.astype(dtype)
    batch = backend.to_device(x), backend.to_device(y.astype(numpy.int64)), source
    return batch + (files,) if return_files else batch


def first_last_ratio(model, grad_norms):
    """||dL/dW|| of the first conv divided by that of the last conv (``grad_norms``
    as recorded, one per :func:`weight_layers` entry; the fc layer is left out).
    > 1: the gradient grows toward the input; < 1: it fades. None when the last
    conv's gradient is exactly 0 (``zero_init_residual``: its BN gamma is 0)."""
    convs = [g for (_, m), g in zip(weight_layers(model), grad_norms) if isinstance(m, nn.Conv2d)]
    return convs[0] / convs[-1] if convs[-1] > 0 else None


def build_pair(depth, in_channels=1, num_classes=10, seed=0, batchnorm=True, zero_init_residual=False,
               dtype=numpy.float32, widths=(16, 32, 64), shortcut="A"):
    """plain-``depth`` and ResNet-``depth`` (CIFAR family, depth 6n+2) with the *same*
    weights: the residual net loads the plain net's state dict, so the shortcuts
    are the only difference (with ``shortcut="B"`` the projection convs, which
    the plain net lacks, keep their own initialization). ``batchnorm=False``:
    see :func:`remove_batchnorm`. ``zero_init_residual`` zeroes the last BN gamma of
    each residual branch (the plain net keeps its gamma: zeroing it would cut
    the plain network in two)."""
    from .models import CifarResNet

    if zero_init_residual and not batchnorm:
        raise ValueError("--zero-init-residual zeroes the last BatchNorm gamma of each residual branch; "
                         "it cannot be combined with --no-bn")
    backend.manual_seed(seed)
    n = (depth - 2) // 6
    plain = CifarResNet(n, num_classes, in_channels, plain=True, widths=widths).astype(dtype)
    resnet = CifarResNet(n, num_classes, in_channels, shortcut=shortcut, widths=widths).astype(dtype)
    if not batchnorm:
        remove_batchnorm(plain)
        remove_batchnorm(resnet)
    state = resnet.state_dict()
    state.update(plain.state_dict())  # same weights: the shortcuts are the only difference
    resnet.load_state_dict(state)
    if zero_init_residual:
        for block in resnet.blocks():
            block.last_bn().params["weight"].fill(0)
    return plain, resnet


def measure(model, x, y):
    """One training-mode forward/backward; returns the recorder's dict plus the loss."""
    from .nn import CrossEntropyLoss

    loss_fn = CrossEntropyLoss()
    model.train()
    loss = loss_fn(model(x), y)
    model.zero_grad()
    with record_gradients(model) as rec:
        model.backward(loss_fn.backward())
    out = rec.as_dict()
    out["loss"] = loss
    out["first_last_conv_ratio"] = first_last_ratio(model, rec.grad_norms)
    return out


def gradflow_at_init(depths=(20, 56, 110), batch=128, seed=0, batchnorm=True, zero_init_residual=False,
                     data_dir=None, synthetic=False, dataset="fashion-mnist", shortcut="A", log=print,
                     dtype=numpy.float64):
    """Plain-N and ResNet-N for each depth, one batch, one backward each.

    ``dtype`` float64 (the default) makes the numbers hold across machines: a
    plain-110's gradient is a product of ~110 Jacobians, and in float32 the
    rounding of each matrix product (which depends on the BLAS kernel: AVX2 or
    AVX-512, OpenBLAS or MKL) moves the first/last ratio by tens of percent
    (5.7e6 on one machine, 3.5e6 on another, same seed). In float64 the
    machines agree to many digits. One batch is cheap enough for that.

    Returns ``{"models": {"plain20": {...}, "resnet20": {...}, ...}, "config": {...}}``
    where each model holds ``layers``, ``grad_norms``, ``blocks``,
    ``input_grad_norms`` (input to output), ``loss`` and ``first_last_conv_ratio``.
    """
    from .data import DATASETS

    for depth in depths:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depths must be 6n+2 with n >= 1 (8, 14, 20, 56, 110, ...), got {depth}")
    info = DATASETS[dataset]
    dtype = numpy.dtype(dtype)
    x, y, source, files = load_batch(batch, seed, data_dir, dataset, synthetic, dtype, return_files=True)
    if files:
        from .data import files_banner
        log(files_banner(dataset, files))
    log(f"batch: {source}")
    models = {}
    for depth in depths:
        plain, resnet = build_pair(depth, info.channels, info.num_classes, seed, batchnorm, zero_init_residual,
                                   dtype=dtype, shortcut=shortcut)
        for name, model in ((f"plain{depth}", plain), (f"resnet{depth}", resnet)):
            start = time.perf_counter()
            models[name] = measure(model, x, y)
            r = models[name]
            ratio = r["first_last_conv_ratio"]
            log(f"{name:>10}: loss {r['loss']:.4g}, ||dW|| first conv {r['grad_norms'][0]:.3e}, "
                f"first/last conv ratio {'n/a (last is 0)' if ratio is None else f'{ratio:.3g}'} "
                f"({time.perf_counter() - start:.1f} s)")
    config = {"depths": list(depths), "batch": batch, "seed": seed, "batchnorm": batchnorm,
              "zero_init_residual": zero_init_residual, "dataset": dataset, "data": source,
              "synthetic": source.startswith("SYNTHETIC"), "mode": "train (BN uses batch statistics)",
              "shortcut": shortcut,
              "init": "He normal (fan_out) convs, PyTorch-default Linear; "
                      "plain and residual nets share their weights",
              "conv_bias": not batchnorm, "dtype": dtype.name, "backend": backend.backend_name(),
              "data_files": files,
              "ratio": "||dL/dW|| of the first conv / ||dL/dW|| of the last conv"}
    return {"models": models, "config": config}


# --- command line ------------------------------------------------------------------

def _depth(text):
    value = int(text)
    if value < 8 or (value - 2) % 6:
        import argparse
        raise argparse.ArgumentTypeError(f"depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {text}")
    return value


def add_parser(sub):
    """``python -m minires gradflow``."""
    p = sub.add_parser("gradflow", help="gradient norms per layer at initialization, plain vs residual",
                       description="Build plain-N and ResNet-N with the same weights, run one training-mode "
                                   "forward/backward on a Fashion-MNIST batch, and write DIR/gradflow.json "
                                   "and DIR/gradflow.png (gradient norm per layer, log scale).")
    p.add_argument("--depths", type=_depth, nargs="+", default=[20, 56, 110], metavar="N")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128, help="images in the batch (default 128)")
    p.add_argument("--no-bn", dest="batchnorm", action="store_false",
                   help="remove every BatchNorm (replaced by identities; convs get PyTorch's default bias back)")
    p.add_argument("--zero-init-residual", action="store_true",
                   help="zero the last BN gamma of each residual branch (every block starts as identity)")
    p.add_argument("--shortcut", default="A", choices=["A", "B"],
                   help="where a stage changes shape: A = zero-padded identity (the paper's CIFAR choice, "
                        "default), B = 1x1 conv + BN projection")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the one forward/backward (default: float64, so the numbers agree "
                        "across machines; float32 moves with the BLAS kernel)")
    p.add_argument("--data-dir", help="folder holding the Fashion-MNIST files; an error if it lacks them")
    p.add_argument("--synthetic", action="store_true", help="use a random batch instead of real images")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.set_defaults(run=run)


def run(args):
    from .plots_gradflow import plot_gradflow

    if args.batch < 2:
        raise ValueError(f"--batch must be >= 2 (BatchNorm needs a batch), got {args.batch}")
    backend.set_backend(args.backend)
    data = gradflow_at_init(args.depths, args.batch, args.seed, args.batchnorm, args.zero_init_residual,
                            args.data_dir, args.synthetic, shortcut=args.shortcut, dtype=args.dtype)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "gradflow.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    png_path = os.path.join(args.out, "gradflow.png")
    plot_gradflow(data, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0
