"""The degradation experiment (He et al. 2016, Fig. 1 and Fig. 6), on Fashion-MNIST.

Train plain-20, plain-56, ResNet-20 and ResNet-56 (optionally also the 32- and
44-layer nets) with the same recipe, the same initial seed and the same data
order, and follow their training error and test error over the iterations. He et al. found that the deeper *plain*
network has the higher *training* error -- not overfitting, an optimization
problem -- while the deeper ResNet does at least as well as the shallower one.

While plain-56 and ResNet-56 train, :func:`minires.gradflow.record_gradients`
notes every weight layer's gradient norm, for the heatmap of gradient flow
during training.

``python -m minires degradation --quick --out DIR`` (2-core CPU, about 10
minutes), ``--standard`` (2-core CPU, about 40 minutes: the paper's ordering,
with every ResNet branch starting at zero) or ``--full`` (a GPU:
``--backend cupy``) writes into DIR:

* ``degradation.json`` -- config and, per network, iterations, train error,
  test error, seconds;  ``degradation.png`` -- Fig. 6 style curves;
* ``gradflow_training.json`` / ``gradflow_training.png`` -- per-layer gradient
  norms over iterations, plain-56 vs ResNet-56.

Both errors are measured the same way for every network, at every point, in
eval mode (BN running statistics): training error on a fixed stratified subset
of the training images the nets train on, test error on a fixed test subset.
The error on the training mini-batches since the previous point (train mode)
is kept too, as ``train_batch_error``.
"""
import argparse
import json
import os
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy

from . import backend
from .gradflow import record_gradients

NETWORKS = ("plain20", "plain56", "resnet20", "resnet56")
#: what ``networks`` may hold: He et al.'s Fig. 6 has depths 20, 32, 44 and 56
CHOICES = tuple(f"{kind}{depth}" for kind in ("plain", "resnet") for depth in (20, 32, 44, 56))
SCHEDULES = ("step", "cosine")


def depth(name):
    """"plain56" -> 56."""
    return int("".join(ch for ch in name if ch.isdigit()))


@dataclass
class DegradationConfig:
    """One recipe for all the networks (He et al. 2016, sec. 4.2, scaled down).

    SGD with momentum 0.9 and weight decay 1e-4, no augmentation. The lr
    schedule is ``step`` (lr divided by 10 at 1/2 and 3/4 of the run, the
    paper's 32k/48k of 64k iterations) or ``cosine`` (half a cosine from lr
    down to 0), after ``warmup`` iterations of a linear ramp up to lr.
    """
    preset: str = "quick"
    iterations: int = 400        # optimizer steps per network
    batch: int = 64
    subset: int = None           # training images (None: all 60,000)
    image_size: int = 28         # 28, or 14 (2x2 average pooling: 4x less compute)
    eval_every: int = 40         # iterations between measurement points
    eval_size: int = 1000        # test images (a fixed stratified subset)
    train_eval_size: int = 1000  # training images whose error is measured (a fixed stratified subset)
    record_every: int = 4        # iterations between heatmap rows (iteration 1 is always kept)
    lr: float = 0.1
    schedule: str = "step"       # "step" or "cosine"
    warmup: int = 0              # iterations of linear warm-up (0: none)
    zero_init_residual: bool = False  # each residual branch's last BN starts at gamma 0 (plain nets: no effect)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    dataset: str = "fashion-mnist"
    backend: str = "numpy"
    data_dir: str = None
    networks: tuple = NETWORKS

    @property
    def description(self):
        n = "60k" if self.subset is None else f"{self.subset}"
        size = "" if self.image_size == 28 else f", images downsampled to {self.image_size}x{self.image_size}"
        lr = "lr /10 at 1/2 and 3/4" if self.schedule == "step" else "cosine lr"
        warmup = f", {self.warmup}-iteration warm-up" if self.warmup else ""
        zero = ", ResNet branches start at 0 (last BN gamma 0)" if self.zero_init_residual else ""
        return (f"{self.iterations} iterations of batch {self.batch} on {n} training images{size}, "
                f"lr {self.lr:g}{warmup}, {lr}{zero}; errors in eval mode on {self.train_eval_size} fixed "
                f"training and {self.eval_size} test images")

    @property
    def heatmap_networks(self):
        """The deepest plain net and the deepest ResNet: their gradients are recorded."""
        return tuple(max((n for n in self.networks if n.startswith(kind)), key=depth, default=None)
                     for kind in ("plain", "resnet"))


PRESETS = {
    # Sized so that all four networks train, evaluate and record in well under
    # 15 minutes on a 2-core CPU (measured numbers in docs/gradient-flow.md).
    # 400 iterations of 64 = one pass over a 25,600-image stratified subset;
    # images pooled to 14x14, which cuts the compute 4x (the networks are unchanged).
    "quick": dict(iterations=400, batch=64, subset=25600, image_size=14, eval_every=40, eval_size=1000,
                  train_eval_size=1000, record_every=4),
    # 2-core CPU, about 40 minutes: about two passes over all 60,000 training images at 14x14,
    # a 5% warm-up, then a cosine decay to 0; every ResNet starts as its shortcut path, without
    # which this budget is too short for ResNet-56 to pass ResNet-20 (runs in docs/gradient-flow.md).
    "standard": dict(iterations=2000, batch=64, subset=None, image_size=14, eval_every=200, eval_size=2000,
                     train_eval_size=2000, record_every=20, schedule="cosine", warmup=100,
                     zero_init_residual=True),
    # For a GPU (--backend cupy): ~43 epochs of the full training set at 28x28.
    "full": dict(iterations=20000, batch=128, subset=None, image_size=28, eval_every=500, eval_size=10000,
                 train_eval_size=10000, record_every=50),
}


def make_config(preset, **overrides):
    """A :class:`DegradationConfig` from a preset name plus explicit overrides
    (``None`` values are ignored, so CLI defaults fall through to the preset)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = DegradationConfig(**values)
    config.networks = tuple(config.networks)
    for name in ("iterations", "batch", "eval_every", "eval_size", "train_eval_size", "record_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.image_size not in (14, 28):
        raise ValueError(f"image_size must be 28 or 14, got {config.image_size}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    if config.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {config.warmup}")
    if config.iterations - config.warmup < 4:
        raise ValueError(f"iterations must be >= warmup + 4 (the lr drops at 1/2 and 3/4 of the rest), "
                         f"got {config.iterations} iterations and warmup {config.warmup}")
    unknown = [n for n in config.networks if n not in CHOICES]
    if unknown or not config.networks or len(set(config.networks)) != len(config.networks):
        raise ValueError(f"networks must be distinct names among {', '.join(CHOICES)}, got {list(config.networks)}")
    return config


def downsample2x(images):
    """uint8 (N, C, 28, 28) -> uint8 (N, C, 14, 14): mean of each 2x2 patch."""
    n, c, h, w = images.shape
    pooled = images.reshape(n, c, h // 2, 2, w // 2, 2).astype(numpy.float32).mean(axis=(3, 5))
    return numpy.round(pooled).astype(numpy.uint8)


def load_data(config, return_files=False):
    """(train images, train labels, test images, test labels, measured training
    images, their labels), host uint8 arrays; the measured training images are a
    fixed stratified subset of the training images. With ``return_files``, also
    the files read (:func:`minires.data.load_dataset`): ``(arrays, files)``."""
    from .data import load_dataset, subset

    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f"data directory {config.data_dir!r} does not exist")
    (x_train, y_train, x_test, y_test), files = load_dataset(config.dataset, config.data_dir, progress=False,
                                                             return_files=True)
    if config.subset is not None:
        x_train, y_train = subset(x_train, y_train, min(config.subset, len(y_train)), seed=config.seed)
    if config.eval_size < len(y_test):
        x_test, y_test = subset(x_test, y_test, config.eval_size, seed=config.seed)
    if config.image_size == 14:
        x_train, x_test = downsample2x(x_train), downsample2x(x_test)
    # another seed than the training subset's, so a subset smaller than that one is another draw
    x_seen, y_seen = subset(x_train, y_train, min(config.train_eval_size, len(y_train)), seed=config.seed + 1)
    arrays = x_train, y_train, x_test, y_test, x_seen, y_seen
    return (arrays, files) if return_files else arrays


def make_schedule(optimizer, config):
    """The lr schedule of ``config``: an optional linear warm-up, then ``step`` or ``cosine``
    over the remaining iterations."""
    from .optim import CosineLR, LinearWarmup, he2016_cifar

    rest = config.iterations - config.warmup
    after = he2016_cifar(optimizer, total_iterations=rest) if config.schedule == "step" else \
        CosineLR(optimizer, total_steps=rest)
    return LinearWarmup(optimizer, config.warmup, after=after) if config.warmup else after


def train_network(name, config, data, log=print):
    """Train one network; returns its curve dict (and heatmap rows if recorded).

    The model, its initial weights (seeded) and the data order (seeded) are
    the same for every call with the same config: only ``name`` differs.
    """
    from .data import DATASETS, DataLoader
    from .models import build_model
    from .nn import CrossEntropyLoss
    from .optim import SGD
    from .train import evaluate

    info = DATASETS[config.dataset]
    x_train, y_train, x_test, y_test, x_seen, y_seen = data
    backend.manual_seed(config.seed)
    model = build_model(name, num_classes=info.num_classes, in_channels=info.channels,
                        zero_init_residual=config.zero_init_residual)
    loss_fn = CrossEntropyLoss()
    opt = SGD(model, config.lr, config.momentum, config.weight_decay)
    schedule = make_schedule(opt, config)
    train_loader = DataLoader(x_train, y_train, config.batch, shuffle=True, seed=config.seed, drop_last=True,
                              mean=info.mean, std=info.std)
    test_loader = DataLoader(x_test, y_test, 500, mean=info.mean, std=info.std)
    seen_loader = DataLoader(x_seen, y_seen, 500, mean=info.mean, std=info.std)
    if len(train_loader) == 0:
        raise ValueError(f"batch {config.batch} is larger than the {len(y_train)} training images")

    curve = {"iterations": [], "train_error": [], "test_error": [], "train_batch_error": [], "train_loss": [],
             "lr": [], "seconds": []}
    heat = {"iterations": [], "grad_norms": []}
    wrong, seen, loss_sum, iteration = 0, 0, 0.0, 0
    start = time.perf_counter()
    recording = record_gradients(model) if name in config.heatmap_networks else nullcontext()
    with recording as rec:
        while iteration < config.iterations:
            for x, y in train_loader:
                logits = model(x)
                loss = loss_fn(logits, y)
                model.zero_grad()
                model.backward(loss_fn.backward(), input_grad=False)
                lr = opt.lr
                opt.step()
                schedule.step()
                iteration += 1
                wrong += int((logits.argmax(axis=1) != y).sum())
                seen += len(y)
                loss_sum += loss * len(y)
                if rec is not None and (iteration == 1 or iteration % config.record_every == 0):
                    heat["iterations"].append(iteration)
                    heat["grad_norms"].append(rec.grad_norms)
                    heat["layers"] = rec.layers
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    _, train_acc = evaluate(model, seen_loader, loss_fn)
                    _, test_acc = evaluate(model, test_loader, loss_fn)
                    curve["iterations"].append(iteration)
                    curve["train_error"].append(1 - train_acc)
                    curve["test_error"].append(1 - test_acc)
                    curve["train_batch_error"].append(wrong / seen)
                    curve["train_loss"].append(loss_sum / seen)
                    curve["lr"].append(lr)
                    curve["seconds"].append(time.perf_counter() - start)
                    log(f"{name:>9} it {iteration:>6}: train error {100 * (1 - train_acc):5.1f}%  "
                        f"test error {100 * (1 - test_acc):5.1f}%  (batches {100 * wrong / seen:5.1f}%, "
                        f"loss {loss_sum / seen:.3f})  ({time.perf_counter() - start:.0f} s)")
                    wrong, seen, loss_sum = 0, 0, 0.0
                if iteration == config.iterations:
                    break
    return curve, (heat if rec is not None else None)


def run_experiment(config, out, log=print):
    """Train the four networks, write the JSON files and figures into ``out``;
    returns the degradation data dict."""
    from .data import files_banner

    backend.set_backend(config.backend)
    started = time.perf_counter()
    data, files = load_data(config, return_files=True)
    _, _, _, y_test, _, y_seen = data
    log(files_banner(config.dataset, files))
    log(f"degradation ({config.preset}): {config.description}; backend {config.backend}")
    curves, heatmaps = {}, {}
    for name in config.networks:
        curves[name], heat = train_network(name, config, data, log)
        if heat is not None:
            heatmaps[name] = heat
    total = time.perf_counter() - started
    os.makedirs(out, exist_ok=True)
    result = {"config": {**asdict(config), "description": config.description,
                         "recipe": f"SGD momentum {config.momentum:g}, weight decay {config.weight_decay:g}, "
                                   f"lr {config.lr:g}"
                                   + (f", linear warm-up over {config.warmup} iterations" if config.warmup else "")
                                   + (", /10 at 1/2 and 3/4 of the run" if config.schedule == "step"
                                      else ", half a cosine down to 0")
                                   + ("; the last BN of every residual branch starts at gamma 0, so each "
                                      "ResNet starts as its shortcut path (Goyal et al. 2017)"
                                      if config.zero_init_residual else "")
                                   + "; same seed (weights and data order) for all networks; no augmentation",
                         "train_error": f"error on a fixed subset of {len(y_seen)} of the training images "
                                        f"(eval mode)",
                         "test_error": f"error on the fixed subset of {len(y_test)} test images (eval mode)",
                         "train_batch_error": "error on the training mini-batches since the previous point "
                                              "(train mode)",
                         "total_seconds": total, "data_files": files},
              "curves": curves}
    _write_json(os.path.join(out, "degradation.json"), result)
    heat_data = {"config": {"preset": config.preset, "description": config.description,
                            "dataset": config.dataset,
                            "quantity": "||dL/dW|| per weight layer after each recorded backward"},
                 "models": heatmaps}
    _write_json(os.path.join(out, "gradflow_training.json"), heat_data, indent=None)
    draw_figures(out, result, heat_data)
    log(f"total {total:.0f} s; wrote degradation.json/.png and gradflow_training.json/.png in {out}")
    for name, c in curves.items():
        log(f"{name:>9}: final train error {100 * c['train_error'][-1]:.1f}%, "
            f"test error {100 * c['test_error'][-1]:.1f}%")
    return result


def draw_figures(out, result=None, heat_data=None):
    """Draw ``degradation.png`` and ``gradflow_training.png`` in ``out`` from the
    data (read from the JSON files there when not given)."""
    from .plots_gradflow import plot_degradation, plot_gradflow_heatmap

    if result is None or heat_data is None:
        paths = [os.path.join(out, name) for name in ("degradation.json", "gradflow_training.json")]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: run `python -m minires degradation --out {out}` first")
        result, heat_data = (json.load(open(path)) for path in paths)
    plot_degradation(result, os.path.join(out, "degradation.png"))
    config = heat_data["config"]
    plot_gradflow_heatmap(heat_data["models"], os.path.join(out, "gradflow_training.png"),
                          title=f"Weight-gradient norm per layer during training on "
                                f"{config.get('dataset', 'fashion-mnist')}\n"
                                + textwrap.fill(f"({config['preset']} preset: {config['description']})", 110))


def _write_json(path, data, indent=1):
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)


# --- command line ------------------------------------------------------------------

def _presets_help():
    """What each preset sets (an option on the command line overrides it), for ``--help``."""
    lines = ["presets (an option given on the command line overrides the preset's value):"]
    for name in PRESETS:
        config = make_config(name)
        lines.append(textwrap.fill(f"{name}: {config.description}; a point every {config.eval_every} and a "
                                   f"heatmap row every {config.record_every} iterations", 100,
                                   initial_indent="  ", subsequent_indent="    "))
    config = make_config("quick")
    lines.append(f"every preset: SGD momentum {config.momentum:g}, weight decay {config.weight_decay:g}, seed "
                 f"{config.seed}, networks {' '.join(config.networks)}")
    return "\n".join(lines)


def add_parser(sub):
    """``python -m minires degradation``."""
    p = sub.add_parser("degradation", help="train plain-20/56 and ResNet-20/56: error vs iterations (He et al. Fig. 6)",
                       description="Train plain-20, plain-56, ResNet-20 and ResNet-56 with the same recipe on "
                                   "Fashion-MNIST; plot training error (thin) and test error (bold) vs iterations, "
                                   "and per-layer gradient norms during training (plain-56 vs ResNet-56).",
                       epilog=_presets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="2-core CPU, about 10 minutes: a first look (the default)")
    preset.add_argument("--standard", dest="preset", action="store_const", const="standard",
                        help="2-core CPU, about 40 minutes: five times the quick run, every ResNet branch "
                             "starting at zero; its committed run ends in the paper's ordering (docs/gradient-flow.md)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="a GPU run (use with --backend cupy): full training set, 20k iterations")
    p.set_defaults(preset="quick")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int)
    p.add_argument("--iterations", type=int, help="override the preset's iterations")
    p.add_argument("--batch", type=int)
    p.add_argument("--subset", type=int, help="training images")
    p.add_argument("--image-size", type=int, choices=[14, 28])
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-size", type=int, help="test images")
    p.add_argument("--train-eval-size", type=int, help="training images whose error is measured (eval mode)")
    p.add_argument("--record-every", type=int, help="iterations between heatmap rows")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=SCHEDULES, help="lr schedule after the warm-up")
    p.add_argument("--warmup", type=int, help="iterations of linear lr warm-up")
    p.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction,
                   help="start each residual branch's last BatchNorm at gamma 0, so every ResNet starts as its "
                        "shortcut path (the standard preset does; plain nets are unchanged)")
    p.add_argument("--networks", nargs="+", choices=CHOICES, metavar="NET",
                   help=f"which networks to train, in order (default: {' '.join(NETWORKS)}; choices: "
                        f"{' '.join(CHOICES)})")
    p.add_argument("--backend", choices=["numpy", "cupy"])
    p.add_argument("--data-dir")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the figures in --out from its JSON files (no training)")
    p.set_defaults(run=run)


def run(args):
    if args.replot:
        draw_figures(args.out)
        print(f"redrew the figures in {args.out}")
        return 0
    config = make_config(args.preset, seed=args.seed, iterations=args.iterations, batch=args.batch,
                         subset=args.subset, image_size=args.image_size, eval_every=args.eval_every,
                         eval_size=args.eval_size, train_eval_size=args.train_eval_size,
                         record_every=args.record_every, lr=args.lr, schedule=args.schedule, warmup=args.warmup,
                         zero_init_residual=args.zero_init_residual, networks=args.networks, backend=args.backend,
                         data_dir=args.data_dir)
    run_experiment(config, args.out)
    return 0
