"""``python -m minires bench``: runs on a tiny configuration, writes the expected
JSON, refuses bad arguments in one line. No wall-clock assertions: timings only
have to be positive and consistent with each other."""
import json
import os
import subprocess
import sys

import numpy
import pytest

from minires import bench, nn
from minires.models import resnet20

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch", "4", "--input", "3", "16", "16", "--repeat", "2", "--warmup", "1"]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "minires", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_tiny_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(*TINY, "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "whole step" in result.stdout and "per layer" in result.stdout
    data = json.loads(out.read_text())
    assert (data["model"], data["batch"], data["input_shape"], data["rounds"]) == ("resnet20", 4, [3, 16, 16], 1)
    assert "torch" not in data and "ratio" not in data
    mine = data["minires"]
    phases = mine["phases_ms"]
    assert set(phases) == {"forward", "loss", "zero_grad", "backward", "optimizer", "step"}
    assert all(len(p["all"]) == 2 and p["min"] <= p["median"] for p in phases.values())
    # the step is the sum of its phases, step by step
    for i in range(2):
        parts = sum(phases[name]["all"][i] for name in bench.PHASES)
        assert phases["step"]["all"][i] == pytest.approx(parts, rel=1e-9)
    assert mine["images_per_s"] == pytest.approx(1000 * 4 / phases["step"]["median"])
    assert mine["peak_rss_mib"] >= mine["rss_before_step_mib"] > 0
    # one row per leaf layer of the model, in forward order, with output shapes
    leaves = [name for name, m in resnet20().named_modules() if not m.named_children()]
    rows = mine["layers"]["rows"]
    assert [r["layer"] for r in rows] == leaves
    assert rows[0]["output_shape"] == [16, 16, 16] and rows[-1]["output_shape"] == [10]
    assert all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in rows)
    assert mine["float32"]["ok"] and not mine["float32"]["not_float32"]
    assert mine["float32"]["gradients"] > mine["float32"]["activations"] > 0


def test_time_layers_restores_methods_and_flags_float64():
    """The timing wrappers are instance attributes, removed afterwards; a float64
    network is reported as not float32 (the check is real, not a constant)."""
    model = resnet20(in_channels=1).astype(numpy.float64)
    x = numpy.random.default_rng(0).standard_normal((2, 1, 8, 8))
    layers, float32 = bench._time_layers(model, nn.CrossEntropyLoss(), x, numpy.array([1, 2]), 1, lambda: None)
    assert not float32["ok"] and "conv1 output: float64" in float32["not_float32"]
    assert len(layers["rows"]) == len([m for _, m in model.named_modules() if not m.named_children()])
    assert all("forward" not in vars(m) and "backward" not in vars(m) for _, m in model.named_modules())
    model.astype(numpy.float32)
    _, float32 = bench._time_layers(model, nn.CrossEntropyLoss(), x.astype(numpy.float32),
                                    numpy.array([1, 2]), 1, lambda: None)
    assert float32["ok"]


@pytest.mark.slow  # ~14 s: two libraries' workers in alternating rounds
def test_bench_compare_torch_interleaved(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    result = run_cli(*TINY, "--repeat", "1", "--compare", "torch", "--rounds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rounds = [line for line in result.stdout.splitlines() if line.strip().startswith("round ")]
    assert len(rounds) == 2 and all("minires" in r and "torch" in r for r in rounds)
    data = json.loads(out.read_text())
    mine, theirs = data["minires"], data["torch"]
    assert len(mine["phases_ms"]["step"]["all"]) == len(theirs["phases_ms"]["step"]["all"]) == 2
    assert data["ratio"] == pytest.approx(mine["phases_ms"]["step"]["median"] / theirs["phases_ms"]["step"]["median"])
    assert data["rss_ratio"] == pytest.approx(mine["peak_rss_mib"] / theirs["peak_rss_mib"])
    assert data["round_ratios"] == pytest.approx([a / b for a, b in zip(mine["phases_ms"]["step"]["all"],
                                                                        theirs["phases_ms"]["step"]["all"])])
    assert theirs["peak_rss_mib"] > 0 and theirs["versions"]["torch"]
    assert "minires / torch:" in result.stdout


def test_torch_twin_has_minires_parameter_count():
    torch = pytest.importorskip("torch")
    for name, depth, plain in [("resnet20", 20, False), ("plain20", 20, True)]:
        twin = bench._torch_cifar_resnet(depth, plain, 3, 10)
        assert sum(p.numel() for p in twin.parameters()) == resnet20().num_parameters()
        assert twin(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch: must be an integer >= 1, got '0'"),
    (["--model", "resnet7"], "unknown model 'resnet7'"),
    (["--model", "resnet18", "--compare", "torch"], "--compare torch supports the CIFAR networks"),
])
def test_bench_bad_arguments_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
