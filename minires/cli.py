"""``python -m minires COMMAND``: train, evaluate, summary, gradcheck, bench, gradflow, ...

Bad arguments give a one-line error and exit status 2, never a traceback.
"""
import argparse
import json
import sys
from dataclasses import fields

import numpy

from .assignment import add_parser as add_assignment
from .bench import add_parser as add_bench
from .degradation import add_parser as add_degradation
from .gradflow import add_parser as add_gradflow


class UsageError(Exception):
    """Raised by a command for input it cannot use; printed as one line, exit 2."""


def _number(kind, minimum, strict):
    """An argparse type: ``kind`` (int or float) that is > or >= ``minimum``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if strict else value >= minimum):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {'>' if strict else '>='} {minimum}, got {text!r}")
        return value
    parse.__name__ = f"{kind.__name__} {'>' if strict else '>='} {minimum}"
    return parse


_positive_int = _number(int, 1, strict=False)
_non_negative_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0, strict=True)


# --- train / evaluate -----------------------------------------------------------------

# argparse fills in %(default)s; flags whose default is "not given" say in words what that means.
DEFAULT = " (default: %(default)s)"

#: What ``--recipe`` sets. Flags given on the command line win over it: each of
#: these flags has the parser default None ("not given"; checked in add_train),
#: so run_train can tell a given value from an absent one.
RECIPES = {"he2016-cifar": dict(lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="he2016-cifar",
                                augment=True)}


def add_train(sub):
    from .data import DATASETS
    from .models import MODELS
    from .train import SCHEDULES, TrainConfig

    d = TrainConfig()  # the defaults of the command are those of the Python API
    p = sub.add_parser(
        "train", help="train a model on a real dataset",
        description=f"Train a model and write history.json, checkpoint.npz and curves.png to --out. "
                    f"With no flags: {d.model} on all {DATASETS[d.dataset].train_size:,} {d.dataset} "
                    f"training images for {d.epochs} epochs; --subset N trains on a sample of N images.")
    def or_recipe(default):  # the help's ending for a flag that --recipe sets
        return f" (default: {default}; with --recipe, the recipe's)"

    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, choices=sorted(MODELS), metavar="NAME",
                   help="model name (resnet20, plain56, resnet18, ...)" + DEFAULT)
    g.add_argument("--shortcut", default=d.shortcut, choices=["A", "B"],
                   help="A: zero-padded identity, B: 1x1 projection where the shape changes (default: "
                        "%(default)s, as the CIFAR ResNets of He et al. 2016 and minires.models.resnet20(); "
                        "BasicBlock(...) on its own defaults to B, as torchvision's blocks)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=sorted(DATASETS), help="dataset" + DEFAULT)
    g.add_argument("--data-dir", default=d.data_dir, metavar="FOLDER",
                   help="folder holding the dataset files; if it lacks them that is an error, never a fall "
                        "back to another copy (default: $MINIRES_DATA if set, else /usr/share/datasets/NAME, "
                        "~/.cache/minires, then a download)")
    g.add_argument("--subset", type=_positive_int, default=d.subset, metavar="N",
                   help="use a sample of N training (and at most N test) images (default: all of them)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="pad-and-crop + flip (default: on for cifar10 only; with --recipe, on)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=_non_negative_int, default=d.epochs,
                   help="passes over the training set" + DEFAULT)
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="images per step" + DEFAULT)
    g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam", "adamw"], help="optimizer" + DEFAULT)
    g.add_argument("--lr", type=_positive_float, help="initial learning rate" + or_recipe(d.lr))
    g.add_argument("--momentum", type=float, help="SGD momentum" + or_recipe(d.momentum))
    g.add_argument("--weight-decay", type=float, help="L2 weight decay" + or_recipe(d.weight_decay))
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (default: off)")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule over the whole run, stepped every iteration" + or_recipe(d.schedule))
    g.add_argument("--warmup", type=_non_negative_int, default=d.warmup,
                   help="linear warm-up iterations" + DEFAULT)
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="he2016-cifar: SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr /10 at 1/2 and 3/4 "
                        "of the run (He et al. 2016, sec. 4.2: 32k and 48k of 64k iterations), pad-and-crop + flip; "
                        "flags given with it override its values (default: none)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, the sample and the data order" + DEFAULT)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, metavar="FOLDER",
                   help="output folder (history.json, checkpoint.npz, curves.png)" + DEFAULT)
    g.add_argument("--resume", metavar="PATH",
                   help="checkpoint to carry on from, with the settings of the run that saved it: only --out, "
                        "--backend, --data-dir and --no-progress may change, and --epochs with --schedule "
                        "constant (default: a new run)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: one per epoch)")
    p.add_argument("--backend", default=d.backend, choices=["numpy", "cupy"], help="array backend" + DEFAULT)
    p.set_defaults(run=run_train)
    # a recipe's flags must default to None, or a default would override the recipe
    assert all(p.get_default(k) is None for recipe in RECIPES.values() for k in recipe)

    p = sub.add_parser(
        "evaluate", help="test accuracy of a saved checkpoint",
        description="Test loss and accuracy of a checkpoint written by train, on its dataset's test set: "
                    f"all {DATASETS[d.dataset].test_size:,} {d.dataset} test images unless --subset N. "
                    "Why it can differ from the accuracy train printed: train --subset N tests each epoch on a "
                    "stratified sample of at most N test images (drawn with the run's --seed); evaluate uses "
                    "the whole test set, or with --subset N the same sample train used. Both use BatchNorm's "
                    "running statistics (eval mode).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.npz written by train")
    p.add_argument("--model", metavar="NAME", choices=sorted(MODELS),
                   help="refuse the checkpoint unless it holds this model (default: whatever model it holds)")
    p.add_argument("--data-dir", metavar="FOLDER",
                   help="folder holding the dataset files; an error if it lacks them (default: the one the "
                        "checkpoint's run named, else $MINIRES_DATA, /usr/share/datasets/NAME, ~/.cache/minires)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="array backend" + DEFAULT)
    p.add_argument("--subset", type=_positive_int, metavar="N",
                   help="evaluate on the stratified sample of N test images that train --subset N used "
                        "(default: all of them)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: one line of text)")
    p.set_defaults(run=run_evaluate)


def run_train(args):
    from .train import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    # TrainConfig's defaults, then the recipe's values, then the flags given (a recipe's have no default)
    config = TrainConfig(**{**RECIPES.get(args.recipe, {}), **given})
    history = train(config, resume=args.resume)
    if history:
        last = history[-1]
        print(f"final: test accuracy {100 * last['test_acc']:.2f}%  (outputs in {config.out})")


def run_evaluate(args):
    from .data import files_banner
    from .train import evaluate_checkpoint

    if args.model:  # checked before the data is read
        from .checkpoint import load_checkpoint, saved_model_config

        _, _, meta = load_checkpoint(args.checkpoint)
        held = saved_model_config(args.checkpoint, meta)["name"]
        if held != args.model:
            raise UsageError(f"--model {args.model}: {args.checkpoint} holds a {held}")
    result = evaluate_checkpoint(args.checkpoint, args.data_dir, backend_name=args.backend, subset_size=args.subset)
    if args.json:
        print(json.dumps(result))
    else:
        print(files_banner(result["dataset"], result["data_files"]))
        print(f"{result['model']} on {result['dataset']} (epoch {result['epoch']}): "
              f"test loss {result['test_loss']:.4f}, test accuracy {100 * result['test_acc']:.2f}% "
              f"on {result['test_images']} test images")


# --- summary / gradcheck --------------------------------------------------------------

def add_summary(sub):
    from .models import MODELS

    p = sub.add_parser("summary", help="per-layer table of a model: shapes, parameters, mult-adds")
    p.add_argument("model", choices=sorted(MODELS), metavar="MODEL",
                   help="model name (resnet20, plain56, resnet18, ...)")
    p.add_argument("--input", type=_positive_int, nargs=3, metavar=("C", "H", "W"),
                   help="input shape (default: 3 32 32 for CIFAR models, 3 224 224 for ImageNet ones)")
    p.add_argument("--num-classes", type=_positive_int, metavar="N",
                   help="classes of the last layer (default: 10 for CIFAR models, 1000 for ImageNet ones)")
    p.set_defaults(run=run_summary)


def run_summary(args):
    from .models import build_model, summary

    from .models import CIFAR_MODELS

    shape = args.input or ((3, 32, 32) if args.model in CIFAR_MODELS else (3, 224, 224))
    kw = {"in_channels": shape[0]}
    if args.num_classes:
        kw["num_classes"] = args.num_classes
    summary(build_model(args.model, **kw), shape)


def add_gradcheck(sub):
    p = sub.add_parser("gradcheck", help="gradient-check every layer type and a small ResNet")
    p.add_argument("--seed", type=int, default=0, help="seed of the layers' weights and inputs" + DEFAULT)
    p.set_defaults(run=run_gradcheck)


def run_gradcheck(args):
    from . import backend, nn
    from .functional import softmax_cross_entropy_backward, softmax_cross_entropy_forward
    from .gradcheck import check_gradients, check_module
    from .models import BasicBlock, Bottleneck, CifarResNet

    backend.manual_seed(args.seed)
    rng = numpy.random.default_rng(args.seed)
    cases = [
        ("Conv2d 3x3 stride 2 pad 1", nn.Conv2d(3, 4, 3, 2, 1), (2, 3, 7, 7)),
        ("BatchNorm2d (training)", nn.BatchNorm2d(3), (4, 3, 4, 4)),
        ("ReLU", nn.ReLU(), (2, 3, 4, 4)),
        ("Linear", nn.Linear(6, 4), (3, 6)),
        ("MaxPool2d 2x2", nn.MaxPool2d(2), (2, 2, 4, 4)),
        ("AvgPool2d 3x3 stride 2 pad 1", nn.AvgPool2d(3, 2, 1), (2, 2, 5, 5)),
        ("AdaptiveAvgPool2d + Flatten", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), (2, 3, 3, 3)),
        ("BasicBlock, projection (B)", BasicBlock(2, 3, stride=2, shortcut="B"), (3, 2, 5, 5)),
        ("Bottleneck, stride 2", Bottleneck(3, 2, stride=2), (3, 3, 5, 5)),
        ("ResNet-8 (option A), tiny", CifarResNet(1, 3, 2, widths=(2, 3, 4)), (3, 2, 6, 6)),
        ("plain-8, tiny", CifarResNet(1, 3, 2, plain=True, widths=(2, 3, 4)), (3, 2, 6, 6)),
    ]
    print("Centered differences in float64 with a random upstream gradient; "
          "relative error = |a-b| / (|a|+|b|)\n")
    print(f"{'layer':<32} {'worst relative error':>22}   checked")
    rows = []
    for name, module, shape in cases:
        x = backend.to_device(rng.standard_normal(shape))  # where the module's parameters live
        errors = check_module(module, x, num_checks=8)
        rows.append((name, max(errors.values()), f"input + {len(errors) - 1} parameter arrays"))
    # The loss (CrossEntropyLoss's op): a scalar output, so the upstream gradient is a random scalar.
    logits = backend.to_device(rng.standard_normal((5, 4)))
    labels = backend.to_device(rng.integers(0, 4, size=5))
    dloss = float(rng.standard_normal())
    _, cache = softmax_cross_entropy_forward(logits, labels)
    errors = check_gradients(lambda: softmax_cross_entropy_forward(logits, labels)[0],
                             {"logits": logits}, {"logits": softmax_cross_entropy_backward(dloss, cache)},
                             backend.get_array_module(logits).asarray(dloss))
    rows.append(("CrossEntropyLoss (softmax)", errors["logits"], "logits (the labels get none)"))
    worst_all = 0.0
    for name, worst, checked in rows:
        worst_all = max(worst_all, worst)
        print(f"{name:<32} {worst:>22.2e}   {checked}")
    verdict = "all backward passes agree with numerical gradients" if worst_all < 1e-7 else "MISMATCH"
    print(f"\n{verdict} (worst {worst_all:.1e}, bound 1e-7)")
    if worst_all >= 1e-7:
        raise SystemExit(1)


# --- entry point ----------------------------------------------------------------------

# Each entry adds one sub-command; commands with more code live next to it
# (e.g. minires/bench.py defines its own add_parser).
COMMANDS = [add_train, add_summary, add_gradcheck, add_assignment, add_gradflow, add_degradation, add_bench]

#: The commands that run a model and so take ``--kernels`` (see minires/ops.py).
KERNEL_COMMANDS = ("train", "evaluate", "bench", "gradcheck", "gradflow", "degradation")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m minires",
        description="minires: train, inspect and gradient-check hand-written ResNets (NumPy / CuPy).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for name in KERNEL_COMMANDS:
        sub.choices[name].add_argument(
            "--kernels", choices=["fast", "textbook"],
            help="fast: the engine's ops where it has them (minires/kernels/); textbook: every op from "
                 "minires/functional/ (default: $MINIRES_KERNELS, else fast)")
    return parser


def main(argv=None):
    """Parse arguments and run the command; user errors -> one line on stderr, exit 2.

    Set MINIRES_DEBUG=1 to see the full traceback instead.
    """
    import os

    from .checkpoint import CheckpointError
    from .data import DataError, DownloadError

    from . import ops

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, which lists its flags (not the top level's)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with ops.kernels(getattr(args, "kernels", None) or ops.get_kernels()):
            return args.run(args)
    except (UsageError, ValueError, KeyError, FileNotFoundError, CheckpointError, DataError, DownloadError,
            RuntimeError) as err:
        if os.environ.get("MINIRES_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        parser.exit(2, f"minires {args.command}: error: {message}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
