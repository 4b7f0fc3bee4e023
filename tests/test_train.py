"""The training loop, checkpoints, resume and the CLI, on small real subsets."""
import json
import os

import numpy
import pytest

from minires import backend, models
from minires.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minires.cli import main
from minires.data import DataError, load_dataset
from minires.train import NonFiniteError, TrainConfig, first_nonfinite_layer, train


def have_fashion_mnist():
    try:
        load_dataset("fashion-mnist", download=False, progress=False)
    except (FileNotFoundError, DataError):
        return False
    return True


needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not found "
                                "(apt-get install dataset-fashion-mnist)")


SYSTEM_DATA = "/usr/share/datasets/fashion-mnist"  # the Debian package's folder (where have_fashion_mnist finds it)


def tiny(out, **kw):
    base = dict(model="resnet20", dataset="fashion-mnist", epochs=2, batch_size=32, subset=96,
                eval_batch_size=96, out=str(out), seed=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@needs_data
def test_train_writes_history_checkpoint_and_curves(tmp_path):
    history = train(tiny(tmp_path), log=lambda *a: None)
    assert [r["epoch"] for r in history] == [1, 2]
    saved = json.loads((tmp_path / "history.json").read_text())
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
        assert key in saved[0]
    files = saved[0]["data_files"]  # which files the epoch trained on, with their verified checksums
    assert [f["role"] for f in files] == ["train images", "train labels", "test images", "test labels"]
    assert all(f["verified"] and len(f["sha256"]) == 64 and os.path.isfile(f["path"]) for f in files)
    assert saved[0]["lr"] == pytest.approx(0.1) and saved[1]["lr"] < 0.1  # cosine schedule
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    model_state, optim_state, meta = load_checkpoint(str(tmp_path / "checkpoint.npz"))
    assert meta["epoch"] == 2 and meta["model"]["name"] == "resnet20"
    assert "layer3.2.bn2.running_var" in model_state and "momentum_buffer.fc.weight" in optim_state


@pytest.mark.parametrize("accs,expected", [
    ([0.6, 0.7, 0.65], ["60.0%", "70.0%", "65.0%"]),
    ([0.6, 0.65, 0.7, 0.68, 0.71, 0.72], ["60.0%", "65.0%", "70.0%", "68.0%", "71.0%", "72.0%"]),
    ([0.6, 0.65, 0.7, 0.68, 0.71, 0.7, 0.72], ["best and last 72.0%"]),
    ([0.6, 0.65, 0.7, 0.68, 0.71, 0.7, 0.72, 0.73, 0.74, 0.72], ["best 74.0%", "last 72.0%"])])
def test_curves_label_every_test_value_or_only_the_best_and_last(tmp_path, monkeypatch, accs, expected):
    """Up to six epochs every test accuracy is labelled; beyond, only the best and the last, so none overlap."""
    from minires import plots
    history = [dict(epoch=e + 1, train_loss=1.0 / (e + 1), test_loss=1.1 / (e + 1), train_acc=acc, test_acc=acc,
                    batch_losses=[1.0, 0.9]) for e, acc in enumerate(accs)]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.plot_history(history, str(tmp_path / "curves.png"))
    assert [t.get_text() for t in figures[0].axes[1].texts] == expected


def interrupt_at_epoch(monkeypatch, epoch):
    """Make the training loop raise KeyboardInterrupt when ``epoch`` starts (a Ctrl-C)."""
    from minires import train as train_module
    real = train_module.train_one_epoch

    def interrupted(model, loader, loss_fn, opt, schedule, e, progress=True):
        if e == epoch:
            raise KeyboardInterrupt
        return real(model, loader, loss_fn, opt, schedule, e, progress)
    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)


@needs_data
def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Run 2 epochs; separately, run the same command, stop it (Ctrl-C) during
    epoch 2 and resume from the checkpoint: the results are bit-identical."""
    full = train(tiny(tmp_path / "full"), log=lambda *a: None)
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(tmp_path / "half"), log=lambda *a: None)
    resumed = train(tiny(tmp_path / "resumed"), resume=str(tmp_path / "half" / "checkpoint.npz"),
                    log=lambda *a: None)
    for a, b in zip(full, resumed):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == b[key], key  # bit-identical on the NumPy backend
    weights_full, _, _ = load_checkpoint(str(tmp_path / "full" / "checkpoint.npz"))
    weights_resumed, _, _ = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.npz"))
    for name in weights_full:
        assert numpy.array_equal(weights_full[name], weights_resumed[name]), name


@needs_data
def test_resume_refuses_to_stretch_a_finished_schedule(tmp_path):
    """A cosine schedule ends at lr 0 after the planned epochs: resuming with more
    epochs would train at lr 0 without a word, so it is refused."""
    train(tiny(tmp_path / "a", epochs=1), log=lambda *a: None)
    with pytest.raises(CheckpointError, match=r"--epochs \(saved 1, given 2\).*laid out over 1 epochs "
                                              r"and ends there.*saved values \(--epochs 1\)"):
        train(tiny(tmp_path / "b", epochs=2), resume=str(tmp_path / "a" / "checkpoint.npz"),
              log=lambda *a: None)


def saved_run(path, config, epoch=1):
    """A checkpoint as ``train(config)`` leaves it after ``epoch`` (its metadata; no arrays,
    which a refused resume never reaches)."""
    from dataclasses import asdict
    from minires.data import DATASETS

    meta = {"model": config.model_config(DATASETS[config.dataset]), "config": asdict(config), "epoch": epoch,
            "history": [], "schedule": None, "loader_state": {}}
    save_checkpoint(str(path), {}, {}, meta)
    return str(path)


# One other value for every setting a resumed run must keep: a setting added to
# TrainConfig without a line here fails test_resume_checks_every_setting_but_where_output_goes.
OTHER_VALUE = {"model": None, "shortcut": None,  # another architecture: refused by check_model_config
               "dataset": "mnist", "epochs": 3, "batch_size": 16, "lr": 0.5, "momentum": 0.5,
               "weight_decay": 0.0, "nesterov": True, "optimizer": "adam", "schedule": "multistep",
               "warmup": 5, "augment": True, "subset": 192, "seed": 1}
MAY_CHANGE = {"out": "elsewhere", "progress": True, "backend": "cupy", "data_dir": "/data",
              "eval_batch_size": 7}


def test_resume_checks_every_setting_but_where_output_goes(tmp_path):
    from dataclasses import fields
    from minires.train import MAY_CHANGE_ON_RESUME, check_resume_config

    names = {f.name for f in fields(TrainConfig)}
    assert set(MAY_CHANGE_ON_RESUME) == set(MAY_CHANGE) and names == set(OTHER_VALUE) | set(MAY_CHANGE)
    saved = tiny(tmp_path)
    path = saved_run(tmp_path / "c.npz", saved)
    _, _, meta = load_checkpoint(path)
    for name, value in OTHER_VALUE.items():
        if value is None:
            continue
        with pytest.raises(CheckpointError) as info:
            check_resume_config(path, meta, tiny(tmp_path, **{name: value}))
        message = str(info.value)
        assert f"--{name.replace('_', '-')} (saved " in message and message.count("(saved ") == 1, message
    check_resume_config(path, meta, tiny(**MAY_CHANGE))  # all of them at once: fine


@pytest.mark.parametrize("changes, message", [
    # the newcomer's example: every changed flag named, with the command that carries the run on
    (dict(subset=4000, batch_size=64, lr=0.5),
     "--batch-size (saved 128, given 64), --lr (saved 0.1, given 0.5), --subset (saved 2000, given 4000); "
     "--resume carries that run on with its optimizer, learning-rate schedule and data order: rerun with the "
     "saved values (--batch-size 128 --lr 0.1 --subset 2000), or start a new run without --resume"),
    (dict(subset=None), "--subset (saved 2000, given unset); --resume carries"),  # all 60,000 images
    (dict(nesterov=True, seed=3), "--nesterov (saved off, given on), --seed (saved 0, given 3); --resume "
     "carries that run on with its optimizer, learning-rate schedule and data order: rerun with the saved "
     "values (--seed 0, without --nesterov)"),
    (dict(dataset="mnist"), "--dataset (saved fashion-mnist, given mnist)"),  # the same model config
    (dict(epochs=5, augment=True), "--epochs (saved 2, given 5), --augment (saved off, given on); "
     "--resume carries that run on with its optimizer, learning-rate schedule and data order (its "
     "learning-rate schedule was laid out over 2 epochs and ends there): rerun with the saved values "
     "(--epochs 2 --no-augment)"),
])
def test_resume_refuses_changed_settings(tmp_path, changes, message):
    path = saved_run(tmp_path / "c.npz", TrainConfig(subset=2000, progress=False))
    config = TrainConfig(**{"subset": 2000, "out": str(tmp_path / "new"), "progress": False, **changes})
    with pytest.raises(CheckpointError) as info:
        train(config, resume=path, log=lambda *a: None)
    assert message in str(info.value)
    assert not (tmp_path / "new").exists()  # refused before anything was loaded or written


def test_resume_accepts_what_may_change(tmp_path):
    from minires.train import check_resume_config

    for saved, given in [
        (dict(augment=None), dict(augment=False)),  # off either way on Fashion-MNIST
        (dict(schedule="constant", epochs=1), dict(schedule="constant", epochs=4)),  # nothing ends at epoch 1
        (dict(), dict(out="other", progress=True, backend="cupy", data_dir="/d", eval_batch_size=1)),
    ]:
        path = saved_run(tmp_path / "c.npz", tiny(tmp_path, **saved))
        check_resume_config(path, load_checkpoint(path)[2], tiny(**{"out": tmp_path, **given}))
    path = saved_run(tmp_path / "c.npz", tiny(tmp_path, schedule="constant", epochs=1))
    with pytest.raises(CheckpointError, match="--epochs .* --schedule"):  # a cosine from now on: refused
        check_resume_config(path, load_checkpoint(path)[2], tiny(tmp_path, schedule="cosine", epochs=4))


def test_resume_refuses_checkpoints_without_a_run(tmp_path):
    """Checkpoints not written by train() (save_checkpoint with other metadata): a clear error, no KeyError."""
    config = tiny(tmp_path / "new")
    path = saved_run(tmp_path / "c.npz", config)
    _, _, meta = load_checkpoint(path)
    for drop, message in [("config", "does not record the settings of the run that saved it"),
                          ("loader_state", r"lacks the training state --resume needs \(loader_state\)"),
                          ("model", "does not say which model it holds")]:
        save_checkpoint(path, {}, {}, {k: v for k, v in meta.items() if k not in (drop, "entries", "format_version")})
        with pytest.raises(CheckpointError, match=message):
            train(config, resume=path, log=lambda *a: None)
    assert not (tmp_path / "new").exists()


def test_cli_resume_with_changed_flags_is_one_line(tmp_path, capsys):
    path = saved_run(tmp_path / "c.npz", TrainConfig(subset=2000))
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", path, "--subset", "4000", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("minires train: error: ") and "--subset (saved 2000, given 4000)" in err


@needs_data
def test_resume_where_output_and_progress_change(tmp_path, monkeypatch):
    """Another output folder, a progress bar, the data folder named and another
    test batch size: the run carries on where it stopped."""
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(tmp_path / "half"), log=lambda *a: None)
    resumed = train(tiny(tmp_path / "resumed", progress=True, eval_batch_size=40, data_dir=str(SYSTEM_DATA)),
                    resume=str(tmp_path / "half" / "checkpoint.npz"), log=lambda *a: None)
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[1]["lr"] == pytest.approx(0.05)  # the cosine's middle: 3 of the run's 6 steps done
    _, _, meta = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.npz"))
    assert meta["config"]["eval_batch_size"] == 40 and meta["schedule"]["iteration"] == 6


@needs_data
def test_same_seed_same_run(tmp_path):
    a = train(tiny(tmp_path / "a", epochs=1), log=lambda *a: None)
    b = train(tiny(tmp_path / "b", epochs=1), log=lambda *a: None)
    assert a[0]["train_loss"] == b[0]["train_loss"]


@needs_data
def test_resume_refuses_another_architecture(tmp_path):
    train(tiny(tmp_path / "a", epochs=1), log=lambda *a: None)
    # named as a flag, like every other setting (check_model_config stays behind it as a backstop)
    with pytest.raises(CheckpointError, match=r"--model \(saved resnet20, given resnet32\)"):
        train(tiny(tmp_path / "b", model="resnet32"), resume=str(tmp_path / "a" / "checkpoint.npz"),
              log=lambda *a: None)


def test_nonfinite_is_located():
    backend.manual_seed(0)
    model = models.resnet20(in_channels=1)
    model.layer2[0].conv1.params["weight"][0, 0, 0, 0] = numpy.nan
    x = numpy.zeros((2, 1, 8, 8), numpy.float32) + 1
    assert first_nonfinite_layer(model, x) == "layer2.0.conv1"
    x[0, 0, 0, 0] = numpy.inf
    assert first_nonfinite_layer(model, x) == "the input batch"


@needs_data
def test_divergence_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # a 2-epoch run, stopped during epoch 2
        interrupt_at_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(tmp_path, epochs=2), log=lambda *a: None)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    from minires import train as train_module
    real_step = train_module.SGD.step

    def poisoned_step(self):  # a diverging update: weights become NaN
        real_step(self)
        self.model.named_parameters()["layer1.0.conv2.weight"][...] = numpy.nan
    monkeypatch.setattr(train_module.SGD, "step", poisoned_step)
    with pytest.raises(NonFiniteError, match="layer1.0.conv2"):
        train(tiny(tmp_path, epochs=2), resume=str(tmp_path / "checkpoint.npz"), log=lambda *a: None)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"w": numpy.arange(6.0).reshape(2, 3)}, {"lr": 0.1}, {"epoch": 3})
    state, optim, meta = load_checkpoint(path)
    assert numpy.array_equal(state["w"], numpy.arange(6.0).reshape(2, 3))
    assert float(optim["lr"]) == 0.1 and meta["epoch"] == 3 and meta["format_version"] == 1
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    open(path, "wb").write(bytes(flipped))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    numpy.savez(path, w=numpy.zeros(2))
    with pytest.raises(CheckpointError, match="not a minires checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.npz"))


def test_checkpoint_refuses_pickles(tmp_path):
    path = str(tmp_path / "evil.npz")
    numpy.savez(path, __meta__=numpy.array('{"format_version": 1}'), **{"model/w": numpy.array([object()], dtype=object)})
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)  # object arrays need pickle, which we never allow


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "resnet21"], "invalid choice"),
    (["train", "--dataset", "imagenet"], "invalid choice"),
    (["train", "--epochs", "-1"], "must be an integer >= 0"),
    (["train", "--data-dir", "/no/such/dir", "--epochs", "1"], "does not exist"),
    (["evaluate", "--checkpoint", "/no/such/file.npz"], "does not exist"),
])
def test_cli_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@needs_data
def test_cli_train_and_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    main(["train", "--subset", "64", "--epochs", "1", "--batch-size", "32", "--out", out, "--no-progress"])
    assert os.path.exists(os.path.join(out, "checkpoint.npz"))
    printed = capsys.readouterr().out
    assert "data: fashion-mnist, SHA-256 of each file's decompressed content matches" in printed
    assert "train-images-idx3-ubyte" in printed and "t10k-labels-idx1-ubyte" in printed
    with open(os.path.join(out, "history.json")) as f:
        trained_on = json.load(f)[0]["test_acc"]
    checkpoint = os.path.join(out, "checkpoint.npz")
    main(["evaluate", "--checkpoint", checkpoint, "--subset", "64", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "resnet20" and result["test_images"] == 64
    assert result["test_acc"] == trained_on  # --subset N: the very sample train tested on
    assert [f["role"] for f in result["data_files"]] == ["test images", "test labels"]
    main(["evaluate", "--checkpoint", checkpoint, "--model", "resnet20", "--subset", "200"])
    printed = capsys.readouterr().out
    assert "t10k-images-idx3-ubyte" in printed and "on 200 test images" in printed
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--checkpoint", checkpoint, "--model", "resnet56"])
    assert info.value.code == 2 and f"--model resnet56: {checkpoint} holds a resnet20" in capsys.readouterr().err


def test_cli_empty_data_dir_is_an_error(tmp_path, capsys, monkeypatch):
    """The newcomer's example: a named folder without the data never trains on another copy."""
    monkeypatch.delenv("MINIRES_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        main(["train", "--data-dir", str(empty), "--subset", "64", "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("minires train: error: dataset 'fashion-mnist' not found "
                                                   f"in the folder named by --data-dir (data_dir=... in Python): {empty}")
    assert "t10k-labels-idx1-ubyte.gz" in err and "never falls back" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_flag_gets_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--checkpoint", "c.npz", "--modle", "resnet20"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: python -m minires evaluate" in err
    assert "error: unrecognized arguments: --modle resnet20" in err


def test_cli_help_is_grouped_and_says_why_defaults_differ(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    for group in ("model:", "data:", "optimization:", "output:"):
        assert f"\n{group}\n" in shown, group
    assert "BasicBlock(...) on its own defaults to B" in " ".join(shown.split())
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "all 10,000 fashion-mnist test images unless --subset N" in shown
    assert "train --subset N tests each epoch on a stratified sample" in shown


def test_cli_gradcheck_takes_the_kernels_flag(capsys, monkeypatch):
    """`gradcheck --kernels textbook` checks the layers on the textbook's ops (the README quotes both settings)."""
    import minires.gradcheck
    from minires import ops

    real, kinds = minires.gradcheck.check_module, set()

    def spy(*args, **kwargs):
        kinds.add(ops.get_kernels())
        return real(*args, **kwargs)

    monkeypatch.setattr(minires.gradcheck, "check_module", spy)
    assert not main(["gradcheck", "--kernels", "textbook"])  # exit status 0
    assert "all backward passes agree with numerical gradients" in capsys.readouterr().out
    assert kinds == {"textbook"} and ops.get_kernels() == "fast"


@needs_data
def test_cli_kernels_flag_trains_on_the_textbook_then_restores(tmp_path, capsys):
    from minires import ops

    out = str(tmp_path / "run")
    main(["train", "--kernels", "textbook", "--subset", "64", "--epochs", "1", "--batch-size", "32",
          "--out", out, "--no-progress"])
    assert "kernels textbook" in capsys.readouterr().out
    with open(os.path.join(out, "history.json")) as f:
        assert json.load(f)[0]["kernels"] == "textbook"
    assert ops.get_kernels() == "fast"  # the flag holds for the command, not after it


@pytest.mark.parametrize("command", ["train", "evaluate", "bench", "gradcheck", "gradflow", "degradation"])
def test_cli_kernels_flag_on_every_command_that_runs_a_model(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--kernels {fast,textbook}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--kernels", "turbo"])
    assert exit_info.value.code == 2 and "invalid choice: 'turbo'" in capsys.readouterr().err


def test_cli_help_shows_the_defaults(capsys):
    """A newcomer sees in ``train --help`` that a bare ``train`` runs the whole dataset."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # as one line: undo argparse's wrapping
    for text in ("With no flags: resnet20 on all 60,000 fashion-mnist training images for 2 epochs",
                 "--epochs EPOCHS passes over the training set (default: 2)", "(default: fashion-mnist)",
                 "--batch-size BATCH_SIZE images per step (default: 128)",
                 "--lr LR initial learning rate (default: 0.1; with --recipe, the recipe's)",
                 "(default: 0.0005;", "(default: cosine;", "--subset N use a sample of N training (and at most N "
                 "test) images (default: all of them)", "(default: runs/default)"):
        assert text in shown, text
    assert shown.count("(default: ") == 22  # every option but --help (--kernels included)
    for command in ("evaluate", "summary", "gradcheck"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "(default: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    ([], dict(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", augment=None)),
    (["--recipe", "he2016-cifar"], dict(lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="he2016-cifar",
                                        augment=True)),
    # flags typed with the recipe win over its values (they used to be overwritten silently)
    (["--recipe", "he2016-cifar", "--lr", "0.05", "--weight-decay", "0.001", "--no-augment"],
     dict(lr=0.05, momentum=0.9, weight_decay=1e-3, schedule="he2016-cifar", augment=False)),
    (["--recipe", "he2016-cifar", "--schedule", "cosine", "--momentum", "0.5"],
     dict(lr=0.1, momentum=0.5, weight_decay=1e-4, schedule="cosine", augment=True)),
])
def test_cli_train_recipe_and_typed_flags(argv, expected, monkeypatch):
    import minires.train
    seen = {}

    def record(config, resume=None):  # instead of training
        seen["config"] = config
        return []

    monkeypatch.setattr(minires.train, "train", record)
    main(["train"] + argv)
    assert {k: getattr(seen["config"], k) for k in expected} == expected


def test_cli_summary_and_gradcheck(capsys):
    main(["summary", "resnet20"])
    assert "total parameters: 269,722" in capsys.readouterr().out
    main(["gradcheck"])
    assert "all backward passes agree" in capsys.readouterr().out


@pytest.mark.slow
@needs_data
def test_resnet20_reaches_88_percent_on_fashion_mnist(tmp_path):
    """The issue's bar: 2 epochs of ResNet-20 on full Fashion-MNIST, >= 88% test accuracy."""
    history = train(TrainConfig(out=str(tmp_path), progress=False), log=print)
    assert history[-1]["test_acc"] >= 0.88


def test_shortcut_default_agrees_with_the_python_api():
    """``train``'s --shortcut default is that of the CIFAR ResNets it builds (the help names
    the one exception, BasicBlock on its own)."""
    import inspect

    from minires.models.blocks import BasicBlock
    from minires.models.resnet import CifarResNet

    assert TrainConfig().shortcut == inspect.signature(CifarResNet).parameters["shortcut"].default == "A"
    assert type(models.resnet20().layer2[0].downsample).__name__ == "ShortcutA"  # zero-padded identity
    assert inspect.signature(BasicBlock).parameters["shortcut"].default == "B"
