"""The training loop: every stage of a step written out, plus what makes a run
usable -- progress bars, per-epoch history, curves, checkpoints and resume.

One training step, exactly as a learner would write it::

    logits = model(x)                      # forward, each layer keeps its cache
    loss = loss_fn(logits, y)              # softmax cross-entropy, a float
    model.zero_grad()                      # gradients accumulate: clear them
    model.backward(loss_fn.backward())     # backward, last layer first
    opt.step()                             # p -= lr * (update from the gradients)
    schedule.step()                        # lr for the next iteration

(:func:`train_one_epoch` asks a ResNet's backward for ``input_grad=False``:
the gradient of the images is not needed, and skipping it saves time.)

Outputs in ``config.out``: ``history.json`` (one record per epoch, with
the paths and verified SHA-256 of the data files read),
``checkpoint.npz`` (model + optimizer + schedule + RNG state, written
atomically after every epoch) and ``curves.png``.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy

from . import backend, ops
from .checkpoint import CheckpointError, check_model_config, load_checkpoint, save_checkpoint, saved_model_config
from .data import DATASETS, DataLoader, files_banner, load_dataset, subset
from .models import ResNet, build_model
from .nn import CrossEntropyLoss
from .optim import SGD, Adam, AdamW, CosineLR, LinearWarmup, MultiStepLR, he2016_cifar

SCHEDULES = ("cosine", "multistep", "constant", "he2016-cifar")


@dataclass
class TrainConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    optimizer: str = "sgd"          # sgd | adam | adamw
    schedule: str = "cosine"        # see SCHEDULES; "he2016-cifar" = the paper's recipe
    warmup: int = 0                 # linear warm-up iterations
    shortcut: str = "A"
    augment: bool = None            # None: on for CIFAR-10, off for the 28x28 datasets
    subset: int = None              # train on N examples (and test on at most N)
    seed: int = 0
    backend: str = "numpy"
    data_dir: str = None
    out: str = "runs/default"
    eval_batch_size: int = 500
    progress: bool = True

    def model_config(self, info):
        return {"name": self.model, "num_classes": info.num_classes, "in_channels": info.channels,
                "shortcut": self.shortcut}


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message names where it first appeared."""


def validate(config):
    """Raise ValueError for settings that cannot work, before any data is loaded."""
    from .models import MODELS

    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; choose one of: {', '.join(MODELS)}")
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if config.optimizer not in ("sgd", "adam", "adamw"):
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose sgd, adam or adamw")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if int(getattr(config, name)) < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be {'>= 0' if name == 'epochs' else '>= 1'}, got {getattr(config, name)}")
    if config.subset is not None and config.subset < 1:
        raise ValueError(f"subset must be >= 1, got {config.subset}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f"data directory {config.data_dir!r} does not exist")


# What may change when a run is resumed: where its outputs go and how progress
# is shown, where the dataset files are read from, the backend (a checkpoint
# from the CPU carries on on a GPU: it holds NumPy arrays), and the test batch
# size (evaluation uses BatchNorm's running statistics, so the batch size only
# says how many test images go through at once). Every other setting decides
# what is trained, and the checkpoint holds the state it made: the optimizer's
# hyperparameters, the LR schedule laid out over the planned steps, the data
# order of the chosen subset and batch size.
MAY_CHANGE_ON_RESUME = ("out", "progress", "backend", "data_dir", "eval_batch_size")

# Entries of a checkpoint's metadata that --resume needs, besides the configs.
RESUME_STATE = ("epoch", "history", "schedule", "loader_state")


def augment_used(augment, dataset):
    """Whether a run augments its training images: ``augment``, where None means on for CIFAR-10 only."""
    return dataset == "cifar10" if augment is None else augment


def _shown(value):
    """A setting's value as the error message shows it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _flag(name):
    """The command-line flag of a TrainConfig field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _as_argument(name, value):
    """The command-line words that set ``name`` to ``value`` ("" where that is leaving the flag out)."""
    if value is None or (value is False and name == "nesterov"):  # --nesterov has no --no- form
        return ""
    if isinstance(value, bool):
        return _flag(name) if value else "--no-" + _flag(name)[2:]
    return f"{_flag(name)} {value}"


def check_resume_config(path, meta, config):
    """Raise CheckpointError unless ``config`` carries on the run saved in ``meta``.

    ``--resume`` restores that run's optimizer, LR schedule and data order, so a
    setting given anew would be ignored (a new --lr: the schedule brings back
    the saved one) or mixed with the old state (a new --subset or --batch-size
    under a schedule laid out for the old number of steps, which then runs on
    at lr 0). Each differing setting is named with its saved and given value;
    only those in ``MAY_CHANGE_ON_RESUME`` may differ, and ``epochs`` with a
    constant learning rate (nothing then ends with the planned epochs).
    """
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"checkpoint {path!r} does not record the settings of the run that saved it, so --resume "
            f"cannot check that this run carries it on; start a new run without --resume")
    lacking = [key for key in RESUME_STATE if key not in meta]
    if lacking:
        raise CheckpointError(f"checkpoint {path!r} lacks the training state --resume needs "
                              f"({', '.join(lacking)}); start a new run without --resume")
    given = asdict(config)
    differing = []
    # With a constant learning rate nothing ends with the planned epochs: a run may be extended.
    constant_lr = config.schedule == saved.get("schedule", TrainConfig.schedule) == "constant"
    for field in fields(TrainConfig):
        name = field.name
        if name in MAY_CHANGE_ON_RESUME or name == "epochs" and constant_lr:
            continue
        # A setting added to TrainConfig after the checkpoint was saved: the
        # run had the behaviour its default keeps.
        old, new = saved.get(name, field.default), given[name]
        if name == "augment":  # compared as the runs use it: unset is off for Fashion-MNIST
            old = augment_used(old, saved.get("dataset", TrainConfig.dataset))
            new = augment_used(new, config.dataset)
        if old != new:
            differing.append((name, old, new))
    if not differing:
        return

    listed = ", ".join(f"{_flag(name)} (saved {_shown(old)}, given {_shown(new)})" for name, old, new in differing)
    rerun = [_as_argument(name, old) for name, old, _ in differing]
    left_out = [_flag(name) for (name, _, _), words in zip(differing, rerun) if not words]
    saved_values = [" ".join(words for words in rerun if words)]
    if left_out:
        saved_values.append("without " + " ".join(left_out))
    planned = [old for name, old, _ in differing if name == "epochs"]
    # e.g. a cosine reaches lr 0 at the planned end: more epochs would train at lr 0
    why = f" (its learning-rate schedule was laid out over {planned[0]} epochs and ends there)" if planned else ""
    raise CheckpointError(
        f"checkpoint {path!r} was saved by a run with other settings: {listed}; --resume carries that run "
        f"on with its optimizer, learning-rate schedule and data order{why}: rerun with the saved values "
        f"({', '.join(v for v in saved_values if v)}), or start a new run without --resume to train "
        f"with the new settings")


def make_optimizer(config, model):
    if config.optimizer == "sgd":
        return SGD(model, config.lr, config.momentum, config.weight_decay, config.nesterov)
    if config.optimizer == "adam":
        return Adam(model, config.lr, weight_decay=config.weight_decay)
    return AdamW(model, config.lr, weight_decay=config.weight_decay)


def make_schedule(config, optimizer, total_steps):
    """An LR schedule stepped once per iteration (None for a constant lr)."""
    steps = max(1, total_steps - config.warmup)
    after = {
        "cosine": lambda: CosineLR(optimizer, total_steps=steps),
        "multistep": lambda: MultiStepLR(optimizer, milestones=(steps // 2, steps * 3 // 4)),
        "he2016-cifar": lambda: he2016_cifar(optimizer, total_iterations=max(4, steps)),
        "constant": lambda: None,
    }[config.schedule]()
    if config.warmup:
        return LinearWarmup(optimizer, config.warmup, after=after)
    return after


def load_data(config, info):
    """The train and test loaders, and the list of files read (with their
    verified SHA-256: :func:`minires.data.load_dataset`)."""
    (x_train, y_train, x_test, y_test), files = load_dataset(
        config.dataset, config.data_dir, progress=config.progress, return_files=True)
    if config.subset:
        x_train, y_train = subset(x_train, y_train, min(config.subset, len(y_train)), seed=config.seed)
        x_test, y_test = subset(x_test, y_test, min(config.subset, len(y_test)), seed=config.seed)
    train_loader = DataLoader(x_train, y_train, config.batch_size, shuffle=True, seed=config.seed,
                              augment=augment_used(config.augment, config.dataset), flip=info.hflip,
                              mean=info.mean, std=info.std)
    test_loader = DataLoader(x_test, y_test, config.eval_batch_size, mean=info.mean, std=info.std)
    return train_loader, test_loader, files


def first_nonfinite_layer(model, x):
    """Re-run the forward layer by layer; name the first layer whose output is
    not finite (or "the input" if x already is not)."""
    xp = backend.get_array_module(x)
    if not bool(xp.isfinite(x).all()):
        return "the input batch"
    found = []

    def check(name, m, forward, inp):
        out = forward(inp)
        if not found and not bool(xp.isfinite(out).all()):
            found.append(name)
        return out

    try:
        with model.hooks(forward=check):
            model(x)
    finally:
        for _, m in model.named_modules():
            m.cache = None
    return found[0] if found else "the loss"


def first_nonfinite_grad(model):
    """Name of the first parameter (from the input side) with a NaN/inf gradient, or None.

    Checked once per step: first all gradients at once (the all_finite op,
    cheap), and only if that fails one by one.
    """
    grads = model.named_grads()
    if ops.all_finite(list(grads.values())):
        return None
    for name, g in grads.items():
        if not ops.all_finite([g]):
            return name
    return None


def evaluate(model, loader, loss_fn=None):
    """Mean loss and accuracy over a loader, in eval mode (BN uses running stats)."""
    loss_fn = loss_fn or CrossEntropyLoss()
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        total_loss += loss_fn(logits, y) * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += len(y)
    for _, m in model.named_modules():
        m.cache = None  # eval forwards are never followed by a backward
    model.train(was_training)
    return total_loss / seen, correct / seen


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_one_epoch(model, loader, loss_fn, opt, schedule, epoch, progress=True):
    """One pass over ``loader``; returns (mean loss, accuracy, images/s, batch losses)."""
    model.train()
    total_loss, correct, seen, batch_losses = 0.0, 0, 0, []
    start = time.perf_counter()
    bar = _progress(loader, len(loader), f"epoch {epoch}", progress)
    for x, y in bar:
        logits = model(x)
        loss = loss_fn(logits, y)
        if not math.isfinite(loss):
            where = first_nonfinite_layer(model, x)
            raise NonFiniteError(f"loss became {loss} at epoch {epoch}, batch {len(batch_losses)}; "
                                 f"first non-finite value in: {where}")
        model.zero_grad()
        dlogits = loss_fn.backward()
        if isinstance(model, ResNet):  # its first conv can skip the images' gradient, unused here
            model.backward(dlogits, input_grad=False)
        else:
            model.backward(dlogits)
        bad = first_nonfinite_grad(model)
        if bad is not None:
            raise NonFiniteError(f"gradient of {bad} became NaN/inf at epoch {epoch}, batch {len(batch_losses)}")
        opt.step()
        if schedule is not None:
            schedule.step()
        batch_losses.append(loss)
        total_loss += loss * len(y)
        correct += (logits.argmax(axis=1) == y).sum()  # stays on the GPU: no sync per step
        seen += len(y)
        if progress:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{int(correct) / seen:.3f}", img_s=f"{rate:.0f}")
    correct = int(correct)  # (waits for the GPU to finish the epoch)
    seconds = time.perf_counter() - start
    return total_loss / max(seen, 1), correct / max(seen, 1), seen / seconds, batch_losses


def _downsample(values, n=100):
    """At most n averages of consecutive values (for the curves in history.json)."""
    if len(values) <= n:
        return [float(v) for v in values]
    chunks = numpy.array_split(numpy.asarray(values, dtype=float), n)
    return [float(c.mean()) for c in chunks]


def train(config, resume=None, log=print):
    """Train ``config.model`` on ``config.dataset``; returns the history (list of dicts).

    ``resume``: path of a checkpoint written by an earlier run with the same
    settings (:func:`check_resume_config` names any that differ); training goes
    on from the epoch after it, with the same optimizer, schedule and data order,
    so 1 epoch + resume 1 epoch equals 2 epochs (bit for bit on NumPy).
    """
    validate(config)
    backend.set_backend(config.backend)
    backend.manual_seed(config.seed)
    info = DATASETS[config.dataset]
    model_config = config.model_config(info)
    if resume:  # check the checkpoint before the (slow) data loading
        model_state, optim_state, meta = load_checkpoint(resume)
        check_resume_config(resume, meta, config)  # names each changed flag (--model, --dataset, ...)
        check_model_config(resume, meta, model_config)  # and the model itself, as a backstop
    train_loader, test_loader, data_files = load_data(config, info)
    log(files_banner(config.dataset, data_files))
    model = build_model(model_config["name"], **{k: v for k, v in model_config.items() if k != "name"})
    loss_fn = CrossEntropyLoss()
    opt = make_optimizer(config, model)
    schedule = make_schedule(config, opt, config.epochs * len(train_loader))
    history, start_epoch = [], 0

    if resume:
        model.load_state_dict(model_state)
        opt.load_state_dict(optim_state)
        if schedule is not None:
            schedule.load_state_dict(meta["schedule"])
        train_loader.set_state(meta["loader_state"])
        history, start_epoch = meta["history"], meta["epoch"]
        log(f"resumed from {resume} after epoch {start_epoch}")

    os.makedirs(config.out, exist_ok=True)
    checkpoint_path = os.path.join(config.out, "checkpoint.npz")
    log(f"training {config.model} ({model.num_parameters():,} parameters) on {config.dataset}: "
        f"{train_loader.num_samples} train / {len(test_loader.labels)} test images, backend {config.backend}, kernels {ops.get_kernels()}")
    for epoch in range(start_epoch + 1, config.epochs + 1):
        lr, epoch_start = opt.lr, time.perf_counter()
        train_loss, train_acc, images_per_s, batch_losses = train_one_epoch(
            model, train_loader, loss_fn, opt, schedule, epoch, config.progress)
        test_loss, test_acc = evaluate(model, test_loader, loss_fn)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                  "seconds": time.perf_counter() - epoch_start,
                  "images_per_s": images_per_s, "kernels": ops.get_kernels(),
                  "batch_losses": _downsample(batch_losses),
                  "data_files": data_files}  # per epoch: a resumed run may read another copy
        history.append(record)
        log(f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {images_per_s:.0f} img/s, {record['seconds']:.0f} s")
        meta = {"model": model_config, "config": asdict(config), "epoch": epoch, "history": history,
                "schedule": None if schedule is None else schedule.state_dict(),
                "loader_state": train_loader.get_state()}
        save_checkpoint(checkpoint_path, model.state_dict(), opt.state_dict(), meta)
        _write_json(os.path.join(config.out, "history.json"), history)
        from .plots import plot_history
        plot_history(history, os.path.join(config.out, "curves.png"), title=f"{config.model} on {config.dataset}")
    return history


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_model(checkpoint):
    """Rebuild the model saved in ``checkpoint``; returns (model, meta)."""
    model_state, _, meta = load_checkpoint(checkpoint)
    config = saved_model_config(checkpoint, meta)
    kwargs = {k: v for k, v in config.items() if k != "name"}
    try:
        model = build_model(config["name"], **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {checkpoint!r} holds a model config minires cannot build: "
                              f"{config!r} ({err})") from err
    model.load_state_dict(model_state)
    return model, meta


def evaluate_checkpoint(checkpoint, data_dir=None, batch_size=500, backend_name="numpy", subset_size=None):
    """Test loss and accuracy of a saved model on its dataset's test set
    (or on the stratified subset of ``subset_size`` test images that training
    with ``subset=subset_size`` and the same seed tested on); ``data_files``
    lists the test files read, with their verified SHA-256."""
    backend.set_backend(backend_name)
    model, meta = load_model(checkpoint)
    config = TrainConfig(**{k: v for k, v in meta.get("config", {}).items() if k in {f.name for f in fields(TrainConfig)}})
    info = DATASETS[config.dataset]
    (_, _, x_test, y_test), files = load_dataset(config.dataset, data_dir or config.data_dir,
                                                 progress=False, return_files=True)
    if subset_size:  # with the run's seed: the very sample train --subset N tested on
        x_test, y_test = subset(x_test, y_test, min(subset_size, len(y_test)), seed=config.seed)
    loader = DataLoader(x_test, y_test, batch_size, mean=info.mean, std=info.std)
    loss, acc = evaluate(model, loader)
    return {"dataset": config.dataset, "model": meta["model"]["name"], "epoch": meta.get("epoch"),
            "test_images": len(y_test), "test_loss": loss, "test_acc": acc,
            "data_files": [f for f in files if f["role"] in TEST_ROLES]}


TEST_ROLES = ("test images", "test labels", "train and test")
