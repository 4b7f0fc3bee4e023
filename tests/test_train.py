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
    assert saved[0]["lr"] == pytest.approx(0.1) and saved[1]["lr"] < 0.1  # cosine schedule
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    model_state, optim_state, meta = load_checkpoint(str(tmp_path / "checkpoint.npz"))
    assert meta["epoch"] == 2 and meta["model"]["name"] == "resnet20"
    assert "layer3.2.bn2.running_var" in model_state and "momentum_buffer.fc.weight" in optim_state


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
    with pytest.raises(CheckpointError, match="run of 1 epochs.*use --epochs 1"):
        train(tiny(tmp_path / "b", epochs=2), resume=str(tmp_path / "a" / "checkpoint.npz"),
              log=lambda *a: None)


@needs_data
def test_same_seed_same_run(tmp_path):
    a = train(tiny(tmp_path / "a", epochs=1), log=lambda *a: None)
    b = train(tiny(tmp_path / "b", epochs=1), log=lambda *a: None)
    assert a[0]["train_loss"] == b[0]["train_loss"]


@needs_data
def test_resume_refuses_another_architecture(tmp_path):
    train(tiny(tmp_path / "a", epochs=1), log=lambda *a: None)
    with pytest.raises(CheckpointError, match="is for model"):
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
    capsys.readouterr()
    main(["evaluate", "--checkpoint", os.path.join(out, "checkpoint.npz"), "--subset", "200", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "resnet20" and result["test_images"] == 200 and 0 <= result["test_acc"] <= 1


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
