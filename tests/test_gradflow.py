"""Gradient-flow recording: it must not change a single number, it must match
PyTorch's norms for the same weights, and the gradflow command's JSON must
have the documented layout."""
import json
import math

import numpy
import pytest

from minires import backend, nn
from minires.cli import main
from minires.gradflow import blocks, build_pair, record_gradients, remove_batchnorm, weight_layers
from minires.models import CifarResNet
from minires.nn import CrossEntropyLoss

SMALL = (4, 6, 8)  # channel widths that keep the tests fast


def _backward(model, x, y):
    """One training-mode forward/backward; returns (dx, copies of every grad)."""
    loss_fn = CrossEntropyLoss()
    loss_fn(model(x), y)
    model.zero_grad()
    dx = model.backward(loss_fn.backward())
    return dx.copy(), {k: g.copy() for k, g in model.named_grads().items()}


@pytest.mark.parametrize("plain", [False, True])
def test_recording_leaves_gradients_bit_identical(plain, rng):
    backend.manual_seed(0)
    model = CifarResNet(2, 10, 1, plain=plain, widths=SMALL)
    x = rng.standard_normal((6, 1, 12, 12)).astype(numpy.float32)
    y = rng.integers(0, 10, size=6)
    dx_plain, grads_plain = _backward(model, x, y)  # train-mode BN: running stats do not feed the output
    with record_gradients(model) as rec:
        dx_rec, grads_rec = _backward(model, x, y)
    assert numpy.array_equal(dx_plain, dx_rec)
    assert grads_plain.keys() == grads_rec.keys()
    for name in grads_plain:
        assert numpy.array_equal(grads_plain[name], grads_rec[name]), name
    # Every module is back to its class's backward.
    assert not [name for name, m in model.named_modules() if "backward" in vars(m)]
    # One norm per weight layer and per block, in input-to-output order, all finite.
    assert rec.layers[0] == "conv1" and rec.layers[-1] == "fc"
    assert rec.layers == [n for n, _ in weight_layers(model)]
    assert rec.blocks == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert numpy.all(numpy.isfinite(rec.grad_norms)) and numpy.all(numpy.isfinite(rec.input_grad_norms))
    expected = [numpy.linalg.norm(grads_rec[f"{n}.weight"].astype(numpy.float64)) for n in rec.layers]
    numpy.testing.assert_allclose(rec.grad_norms, expected, rtol=1e-12)


def test_recording_restores_methods_after_an_error(rng):
    model = CifarResNet(1, 10, 1, widths=SMALL)
    with pytest.raises(RuntimeError):
        with record_gradients(model):
            model.backward(numpy.ones((2, 10), numpy.float32))  # no forward before: raises
    assert not [name for name, m in model.named_modules() if "backward" in vars(m)]


def test_remove_batchnorm_replaces_every_bn_and_adds_conv_biases(rng):
    model = remove_batchnorm(CifarResNet(1, 10, 1, widths=SMALL))
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    block = model.layer1[0]
    assert block.branch[1] is block.bn1 and not isinstance(block.bn1, nn.BatchNorm2d)
    assert all("bias" in m.params for _, m in weight_layers(model))
    out = model(rng.standard_normal((2, 1, 8, 8)).astype(numpy.float32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_build_pair_shares_weights(shortcut):
    plain, resnet = build_pair(8, widths=SMALL, batchnorm=False, shortcut=shortcut)
    theirs = resnet.state_dict()
    for name, value in plain.state_dict().items():
        assert numpy.array_equal(value, theirs[name]), name
    with pytest.raises(ValueError, match="no-bn"):
        build_pair(8, widths=SMALL, batchnorm=False, zero_init_residual=True)


def _torch_twin(model, plain, batchnorm, shortcut="A"):
    """The PyTorch model of tests/torch_models.py with ``model``'s weights."""
    torch = pytest.importorskip("torch")
    import torch_models as T

    from minires.interop import state_dict_to_torch

    n = len(model.layer1)
    twin = T.CifarResNet(n, 10, 1, shortcut, plain, widths=SMALL).double()
    if not batchnorm:  # as remove_batchnorm: BN -> identity, convs get a bias
        for _, parent in list(twin.named_modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(parent, child_name, torch.nn.Identity())
                elif isinstance(child, torch.nn.Conv2d):
                    setattr(parent, child_name, torch.nn.Conv2d(
                        child.in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, bias=True).double())
    twin.load_state_dict(state_dict_to_torch(model.state_dict()))
    return twin


@pytest.mark.parametrize("plain, batchnorm, shortcut", [
    (True, True, "A"), (False, True, "A"), (True, False, "A"), (False, False, "A"), (False, True, "B")])
def test_norms_match_pytorch_for_the_same_weights(plain, batchnorm, shortcut, rng):
    torch = pytest.importorskip("torch")
    pair = build_pair(14, in_channels=1, seed=3, batchnorm=batchnorm, dtype=numpy.float64, widths=SMALL,
                      shortcut=shortcut)
    model = pair[0] if plain else pair[1]
    twin = _torch_twin(model, plain, batchnorm, shortcut)
    x = rng.standard_normal((5, 1, 12, 12))
    y = rng.integers(0, 10, size=5)

    loss_fn = CrossEntropyLoss()
    loss_fn(model(x), y)
    model.zero_grad()
    with record_gradients(model) as rec:
        model.backward(loss_fn.backward())

    # PyTorch: keep the gradient of each block's input.
    block_inputs = {}

    def keep_input(name):
        def hook(module, args):
            args[0].retain_grad()
            block_inputs[name] = args[0]
        return hook

    torch_modules = dict(twin.named_modules())
    for name in rec.blocks:
        torch_modules[name].register_forward_pre_hook(keep_input(name))
    twin.train()
    torch.nn.functional.cross_entropy(twin(torch.tensor(x)), torch.tensor(y)).backward()
    params = dict(twin.named_parameters())
    theirs = [params[f"{name}.weight"].grad.norm().item() for name in rec.layers]
    theirs_x = [block_inputs[name].grad.norm().item() for name in rec.blocks]

    numpy.testing.assert_allclose(rec.grad_norms, theirs, rtol=1e-6)
    numpy.testing.assert_allclose(rec.input_grad_norms, theirs_x, rtol=1e-6)
    assert len(rec.layers) == 14 + 2 * (shortcut == "B" and not plain) and len(rec.blocks) == 6


def test_gradflow_command_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "gf"
    assert main(["gradflow", "--depths", "8", "14", "--out", str(out), "--synthetic", "--batch", "4"]) == 0
    data = json.loads((out / "gradflow.json").read_text())
    assert set(data) == {"models", "config"}
    assert set(data["models"]) == {"plain8", "resnet8", "plain14", "resnet14"}
    for name, record in data["models"].items():
        depth = int(name.lstrip("plainresnet"))
        assert len(record["layers"]) == len(record["grad_norms"]) == depth
        assert len(record["blocks"]) == len(record["input_grad_norms"]) == (depth - 2) // 2
        assert record["layers"][0] == "conv1" and record["layers"][-1] == "fc"
        assert all(g > 0 for g in record["grad_norms"] + record["input_grad_norms"])
        assert record["first_last_conv_ratio"] == pytest.approx(record["grad_norms"][0] / record["grad_norms"][-2])
    config = data["config"]
    assert config["depths"] == [8, 14] and config["batch"] == 4 and config["batchnorm"] is True
    assert config["synthetic"] is True and config["data"].startswith("SYNTHETIC")
    assert (out / "gradflow.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--depths", "21"], "6n+2"),
    (["--batch", "1"], "batch"),
    (["--no-bn", "--zero-init-residual"], "no-bn"),
])
def test_gradflow_command_rejects_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gradflow", "--out", str(tmp_path), "--synthetic", "--depths", "8", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _have_fashion_mnist():
    from minires.data import locate
    try:
        locate("fashion-mnist", download=False)
    except (FileNotFoundError, OSError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST is not installed")
def test_degradation_command_tiny_run(tmp_path, capsys):
    out = tmp_path / "deg"
    assert main(["degradation", "--quick", "--out", str(out), "--iterations", "4", "--batch", "8",
                 "--subset", "64", "--eval-size", "40", "--eval-every", "2", "--record-every", "3"]) == 0
    data = json.loads((out / "degradation.json").read_text())
    assert set(data["curves"]) == {"plain20", "plain56", "resnet20", "resnet56"}
    for curve in data["curves"].values():
        assert curve["iterations"] == [2, 4]
        assert all(0 <= e <= 1 for e in curve["train_error"] + curve["test_error"])
    assert data["config"]["image_size"] == 14 and data["config"]["iterations"] == 4
    # the run says which files it read, and the JSON keeps them with their checksums
    files = data["config"]["data_files"]
    assert [f["role"] for f in files] == ["train images", "train labels", "test images", "test labels"]
    assert all(len(f["sha256"]) == 64 for f in files)
    printed = capsys.readouterr().out
    assert "data: fashion-mnist" in printed and all(f["path"] in printed for f in files)
    heat = json.loads((out / "gradflow_training.json").read_text())
    assert set(heat["models"]) == {"plain56", "resnet56"}
    for run in heat["models"].values():
        assert run["iterations"] == [1, 3]  # the first iteration, then every 3rd
        assert len(run["layers"]) == 56 and all(len(row) == 56 for row in run["grad_norms"])
    for png in ("degradation.png", "gradflow_training.png"):
        assert (out / png).stat().st_size > 10_000


def test_degradation_presets_and_bad_values():
    from minires.degradation import make_config

    quick = make_config("quick")
    assert quick.iterations * quick.batch == quick.subset  # one pass over the subset
    assert make_config("full", iterations=10).iterations == 10
    standard = make_config("standard")
    assert (standard.schedule, standard.subset, standard.image_size) == ("cosine", None, 14)
    assert 0 < standard.warmup < standard.iterations // 10
    assert standard.heatmap_networks == ("plain56", "resnet56")
    assert make_config("quick", networks=["resnet20", "plain32", "resnet44"]).heatmap_networks == ("plain32", "resnet44")
    with pytest.raises(ValueError, match="preset"):
        make_config("medium")
    with pytest.raises(ValueError, match="batch"):
        make_config("quick", batch=0)
    with pytest.raises(ValueError, match="schedule"):
        make_config("quick", schedule="linear")
    with pytest.raises(ValueError, match="warmup"):
        make_config("quick", iterations=10, warmup=8)
    with pytest.raises(ValueError, match="networks"):
        make_config("quick", networks=["resnet110"])


def test_degradation_zero_init_residual_starts_every_resnet_branch_at_zero(monkeypatch):
    """--zero-init-residual (on in the standard preset) reaches the model that trains."""
    import minires.models
    from minires.degradation import make_config, train_network
    from minires.models.blocks import ResidualBlock

    real, gammas = minires.models.build_model, []

    def spy(name, **kw):
        model = real(name, **kw)
        gammas.append([float(abs(b.last_bn().params["weight"]).max())
                       for b in model.blocks() if isinstance(b, ResidualBlock)])
        return model

    monkeypatch.setattr(minires.models, "build_model", spy)
    rng = numpy.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 1, 14, 14), dtype=numpy.uint8), rng.integers(0, 10, 16)
    data = (images, labels, images[:8], labels[:8], images[:8], labels[:8])
    assert make_config("standard").zero_init_residual and not make_config("quick").zero_init_residual
    for zero in (True, False):
        config = make_config("quick", iterations=4, batch=4, eval_every=4, record_every=4, networks=["resnet20"],
                             zero_init_residual=zero)
        curve, _ = train_network("resnet20", config, data, log=lambda line: None)
        assert len(gammas[-1]) == 9 and (max(gammas[-1]) == 0) == zero
        assert curve["iterations"] == [4]
    assert "gamma 0" in make_config("standard").description


def test_degradation_schedule_warms_up_then_follows_the_cosine_or_the_steps():
    from minires.degradation import make_config, make_schedule

    class Opt:  # make_schedule only reads and sets .lr
        lr = 0.1

    def lrs(**overrides):
        opt = Opt()
        sched = make_schedule(opt, make_config("quick", iterations=20, **overrides))
        return [opt.lr] + [sched.step() for _ in range(19)]

    cosine = lrs(schedule="cosine", warmup=4)
    assert cosine[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert cosine[4] == pytest.approx(0.1) and cosine[10] == pytest.approx(0.05 * (1 + math.cos(math.pi * 6 / 16)))
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    step = lrs(schedule="step")
    assert step == pytest.approx([0.1] * 10 + [0.01] * 5 + [0.001] * 5)


@pytest.mark.slow
@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST is not installed")
def test_degradation_standard_shortened_run_writes_json_and_figures(tmp_path):
    """The --standard preset, cut short: the files are well formed (the ordering needs the whole run)."""
    out = tmp_path / "std"
    assert main(["degradation", "--standard", "--out", str(out), "--iterations", "24", "--warmup", "4",
                 "--eval-every", "12", "--record-every", "6", "--train-eval-size", "200", "--eval-size", "200",
                 "--networks", "plain20", "plain32", "resnet20", "resnet32"]) == 0
    data = json.loads((out / "degradation.json").read_text())
    config = data["config"]
    assert (config["preset"], config["schedule"], config["warmup"], config["subset"]) == ("standard", "cosine", 4, None)
    assert "eval mode" in config["train_error"] and "200" in config["train_error"]
    assert config["total_seconds"] > 0 and "cosine" in config["recipe"]
    assert config["zero_init_residual"] is True and "gamma 0" in config["recipe"]
    assert list(data["curves"]) == ["plain20", "plain32", "resnet20", "resnet32"]
    for curve in data["curves"].values():
        assert curve["iterations"] == [12, 24]
        for key in ("train_error", "test_error", "train_batch_error"):
            assert len(curve[key]) == 2 and all(0 <= e <= 1 for e in curve[key])
        # train_error counts whole images of the 200: a multiple of 1/200
        assert all(abs(200 * e - round(200 * e)) < 1e-9 for e in curve["train_error"])
        assert curve["lr"][0] == pytest.approx(0.1 * (1 + math.cos(math.pi * 7 / 20)) / 2)
    heat = json.loads((out / "gradflow_training.json").read_text())
    assert set(heat["models"]) == {"plain32", "resnet32"}
    assert all(len(run["layers"]) == 32 for run in heat["models"].values())
    for png in ("degradation.png", "gradflow_training.png"):
        assert (out / png).stat().st_size > 10_000


def test_missing_dataset_is_an_error_never_a_synthetic_batch(monkeypatch):
    import minires.data
    from minires.gradflow import load_batch

    def nowhere(*args, **kwargs):
        raise FileNotFoundError("dataset 'fashion-mnist' not found")

    monkeypatch.setattr(minires.data, "load_dataset", nowhere)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_batch(6, seed=0)
    with pytest.raises(FileNotFoundError):  # a folder the user named must exist
        load_batch(6, data_dir="/nonexistent/folder")
    x, y, source = load_batch(6, seed=0, synthetic=True)  # noise only when asked for, and labelled
    assert x.shape == (6, 1, 28, 28) and x.dtype == numpy.float32 and y.shape == (6,)
    assert source.startswith("SYNTHETIC") and "requested" in source


def test_degradation_figure_zooms_where_the_curves_end_close(tmp_path, monkeypatch):
    """The ResNets' curves end half a point apart on a 0-90% axis: an inset shows the second half;
    the plain nets end 40 points apart and get none."""
    from minires import plots_gradflow

    def curve(errors):
        return {"iterations": [200 * (i + 1) for i in range(len(errors))], "train_error": errors,
                "test_error": [e + 0.01 for e in errors], "train_batch_error": errors}

    data = {"config": {"preset": "standard", "description": "test", "dataset": "fashion-mnist"},
            "curves": {"plain20": curve([0.3, 0.2, 0.15, 0.1]), "plain56": curve([0.8, 0.8, 0.7, 0.5]),
                       "resnet20": curve([0.3, 0.15, 0.1, 0.094]), "resnet56": curve([0.3, 0.16, 0.1, 0.089])}}
    figures = []
    monkeypatch.setattr(plots_gradflow.plt, "close", figures.append)
    plots_gradflow.plot_degradation(data, str(tmp_path / "degradation.png"))
    ax_plain, ax_res = figures[0].axes[:2]
    assert not ax_plain.child_axes and len(ax_res.child_axes) == 1
    inset = ax_res.child_axes[0]
    assert inset.get_ylim()[1] < 20 and [list(line.get_xdata()) for line in inset.lines][0] == [400, 600, 800]
