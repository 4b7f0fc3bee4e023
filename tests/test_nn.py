"""nn modules: gradient checks of inputs and every parameter, parity with
torch.nn, the Module API (names, state dicts, modes) and clear errors."""
import numpy
import pytest

from minires import backend, nn
from minires.gradcheck import check_module, rel_error

TOL = 1e-7


def small_modules():
    """(name, factory, input shape) for every layer type, sized for a quick check."""
    return [
        ("conv3x3", lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
        ("conv_stride2_nobias", lambda: nn.Conv2d(2, 3, (3, 2), stride=2, padding=(1, 0), bias=False), (2, 2, 7, 6)),
        ("bn", lambda: nn.BatchNorm2d(3), (4, 3, 3, 3)),
        ("relu", nn.ReLU, (2, 3, 4)),
        ("linear", lambda: nn.Linear(6, 4), (5, 6)),
        ("maxpool", lambda: nn.MaxPool2d(2), (2, 2, 4, 6)),
        ("avgpool", lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 2, 5, 5)),
        ("gap", lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 4, 5)),
        ("flatten", nn.Flatten, (2, 3, 2, 2)),
        ("sequential", lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)), (3, 2, 4, 4)),
    ]


@pytest.mark.parametrize("name,factory,shape", small_modules(), ids=[m[0] for m in small_modules()])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_gradcheck(xp, name, factory, shape, mode):
    module = factory().astype(numpy.float64)
    module.train(mode == "train")
    if mode == "eval":  # give BatchNorm non-trivial running stats first
        for _, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.buffers["running_mean"][...] = xp.asarray(numpy.linspace(-1, 1, m.num_features))
                m.buffers["running_var"][...] = xp.asarray(numpy.linspace(0.5, 2, m.num_features))
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.standard_normal(shape))
    errors = check_module(module, x)
    print(name, mode, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors
    assert set(errors) == {"input", *module.named_parameters()}


@pytest.mark.softmax_cross_entropy_forward
@pytest.mark.softmax_cross_entropy_backward
def test_cross_entropy_module(rng):
    fn = nn.CrossEntropyLoss()
    logits = rng.standard_normal((4, 3))
    labels = numpy.array([0, 2, 1, 2])
    loss = fn(logits, labels)
    assert isinstance(loss, float)
    p = numpy.exp(logits) / numpy.exp(logits).sum(1, keepdims=True)
    assert abs(loss - -numpy.log(p[range(4), labels]).mean()) < 1e-12
    onehot = numpy.eye(3)[labels]
    assert rel_error(fn.backward(), (p - onehot) / 4) < 1e-12


# --- parity with PyTorch --------------------------------------------------------------

def torch_twins():
    import torch.nn as tnn
    return [
        ("conv", lambda: nn.Conv2d(3, 5, 3, stride=1, padding=1), lambda: tnn.Conv2d(3, 5, 3, 1, 1), (2, 3, 7, 6)),
        ("conv_s2", lambda: nn.Conv2d(3, 4, (3, 1), stride=2, padding=(1, 0), bias=False),
         lambda: tnn.Conv2d(3, 4, (3, 1), stride=2, padding=(1, 0), bias=False), (3, 3, 9, 8)),
        ("bn", lambda: nn.BatchNorm2d(4), lambda: tnn.BatchNorm2d(4), (5, 4, 3, 3)),
        ("relu", nn.ReLU, tnn.ReLU, (2, 3, 4, 4)),
        ("linear", lambda: nn.Linear(7, 3), lambda: tnn.Linear(7, 3), (4, 7)),
        ("maxpool", lambda: nn.MaxPool2d(3, 2, 1), lambda: tnn.MaxPool2d(3, 2, 1), (2, 3, 9, 7)),
        ("avgpool", lambda: nn.AvgPool2d(2), lambda: tnn.AvgPool2d(2), (2, 3, 6, 8)),
        ("gap", lambda: nn.AdaptiveAvgPool2d(1), lambda: tnn.AdaptiveAvgPool2d(1), (2, 3, 5, 5)),
        ("flatten", nn.Flatten, tnn.Flatten, (2, 3, 2, 2)),
    ]


@pytest.mark.parametrize("dtype,tol", [(numpy.float64, 1e-9), (numpy.float32, 1e-5)])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("index", range(9))
def test_module_parity_with_torch(index, mode, dtype, tol, kernels):
    torch = pytest.importorskip("torch")
    from torch_parity import compare
    name, make, make_torch, shape = torch_twins()[index]
    torch.manual_seed(0)
    module = make().astype(dtype).train(mode == "train")
    if mode == "eval":
        for _, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.buffers["running_mean"][...] = numpy.linspace(-1, 1, m.num_features)
                m.buffers["running_var"][...] = numpy.linspace(0.5, 2, m.num_features)
    x = numpy.random.default_rng(1).standard_normal(shape).astype(dtype)
    worst = compare(module, make_torch(), x, steps=3)
    print(name, mode, numpy.dtype(dtype).name, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= tol, worst


@pytest.mark.softmax_cross_entropy_forward
@pytest.mark.softmax_cross_entropy_backward
def test_cross_entropy_parity_with_torch(rng):
    torch = pytest.importorskip("torch")
    logits = rng.standard_normal((6, 4)) * 5
    labels = rng.integers(0, 4, 6)
    fn = nn.CrossEntropyLoss()
    loss = fn(logits, labels)
    dlogits = fn.backward()
    t = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(t, torch.tensor(labels))
    tloss.backward()
    assert abs(loss - tloss.item()) <= 1e-12 * abs(loss)
    assert rel_error(dlogits, t.grad.numpy()) < 1e-12


def test_init_statistics():
    backend.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3)
    std = float(conv.params["weight"].std())
    assert abs(std - numpy.sqrt(2 / (128 * 9))) < 0.01 * std  # Kaiming normal, fan_out
    lin = nn.Linear(100, 10)
    assert float(numpy.abs(lin.params["weight"]).max()) <= 0.1
    bn = nn.BatchNorm2d(3)
    assert numpy.array_equal(bn.params["weight"], numpy.ones(3))
    assert conv.params["weight"].dtype == numpy.float32


# --- the Module API -------------------------------------------------------------------

def test_names_and_state_dict():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    assert list(net.named_parameters()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.1.weight", "2.1.bias"]
    assert list(net.named_grads()) == list(net.named_parameters())
    state = net.state_dict()
    assert set(state) == set(net.named_parameters()) | {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert all(isinstance(v, numpy.ndarray) for v in state.values())
    state["0.weight"][...] = 7  # a copy: the module is untouched
    assert not numpy.any(net.named_parameters()["0.weight"] == 7)
    weight = net.named_parameters()["0.weight"]
    net.load_state_dict(state)
    assert numpy.all(weight == 7), "load_state_dict must copy in place, keeping references valid"
    assert net.num_parameters() == 2 * 9 + 2 + 2 + 2 + 4 + 2


def test_load_state_dict_errors():
    net = nn.Sequential(nn.Linear(3, 2))
    state = net.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['0.bias'\]"):
        net.load_state_dict({"0.weight": state["0.weight"]})
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        net.load_state_dict({**state, "extra": numpy.zeros(1)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(3, 3\), expected \(2, 3\)"):
        net.load_state_dict({**state, "0.weight": numpy.zeros((3, 3))})


def test_train_eval_zero_grad_astype(rng):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    net.eval()
    assert not any(m.training for _, m in net.named_modules())
    net.train()
    assert all(m.training for _, m in net.named_modules())
    x = rng.standard_normal((2, 1, 5, 5)).astype(numpy.float32)
    out = net(x)
    net.backward(rng.standard_normal(out.shape).astype(numpy.float32))
    assert any(float(numpy.abs(g).sum()) > 0 for g in net.named_grads().values())
    net.zero_grad()
    assert all(float(numpy.abs(g).sum()) == 0 for g in net.named_grads().values())
    net.astype(numpy.float64)
    assert all(p.dtype == numpy.float64 for p in net.named_parameters().values())
    assert net.named_buffers()["1.num_batches_tracked"].dtype == numpy.int64


def test_gradients_accumulate(rng):
    lin = nn.Linear(3, 2).astype(numpy.float64)
    x, dout = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    lin(x)
    lin.backward(dout)
    once = lin.grads["weight"].copy()
    lin(x)
    lin.backward(dout)
    assert numpy.allclose(lin.grads["weight"], 2 * once)


def test_bad_inputs_raise_clear_errors(rng):
    conv = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match=r"Conv2d\(3, 8.*expected input of shape \(\*, 3, \*, \*\), got \(2, 4, 5, 5\)"):
        conv(numpy.zeros((2, 4, 5, 5), numpy.float32))
    with pytest.raises(ValueError, match=r"got \(3, 5, 5\)"):
        conv(numpy.zeros((3, 5, 5), numpy.float32))
    with pytest.raises(ValueError, match="expected float32 input"):
        conv(numpy.zeros((1, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*\(\*, 4, \*, \*\), got \(2, 3, 2, 2\)"):
        nn.BatchNorm2d(4)(numpy.zeros((2, 3, 2, 2), numpy.float32))
    with pytest.raises(ValueError, match=r"Linear.*\(\*, 5\), got \(2, 4\)"):
        nn.Linear(5, 2)(numpy.zeros((2, 4), numpy.float32))


def test_backward_without_forward_raises(rng):
    relu = nn.ReLU()
    with pytest.raises(RuntimeError, match="without a matching forward"):
        relu.backward(numpy.ones(3))
    relu(rng.standard_normal(3))
    relu.backward(rng.standard_normal(3))
    with pytest.raises(RuntimeError, match="without a matching forward"):
        relu.backward(rng.standard_normal(3))  # twice on one cache


def test_repr_is_readable():
    text = repr(nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU()))
    assert "(0): Conv2d(1, 2, kernel_size=(3, 3)" in text and "(1): ReLU()" in text


def test_batchnorm_counts_training_batches_only(xp, rng):
    """num_batches_tracked (torchvision's buffer) +1 per training forward; eval leaves it."""
    bn = nn.BatchNorm2d(3).astype(numpy.float64)  # built on xp's backend
    x = xp.asarray(rng.standard_normal((4, 3, 2, 2)))
    bn(x)
    bn(x)
    bn.eval()
    bn(x)
    assert int(bn.buffers["num_batches_tracked"]) == 2


# --- Module.hooks ------------------------------------------------------------------

def test_hooks_run_around_forward_and_backward_then_go(rng):
    from minires.models import resnet20

    model = resnet20(num_classes=3).astype(numpy.float64)
    x = rng.standard_normal((2, 3, 8, 8))
    seen = {"forward": [], "backward": []}

    def record(kind):
        def hook(name, m, call, arg):
            out = call(arg)
            seen[kind].append((name, tuple(arg.shape), None if out is None else tuple(out.shape)))
            return out
        return hook

    reference = model(x)
    dout = rng.standard_normal(reference.shape)  # random: an all-ones dout would hide BatchNorm's terms
    model.zero_grad()
    model.backward(dout)
    reference_grads = {k: g.copy() for k, g in model.named_grads().items()}
    model.zero_grad()
    with model.hooks(forward=record("forward"), backward=record("backward")) as hooked:
        assert hooked is model
        out = model(x)
        model.backward(dout, input_grad=False)  # options pass through the hooks
    assert all(numpy.array_equal(g, reference_grads[k]) for k, g in model.named_grads().items())
    leaves = [n for n, m in model.named_modules() if not m.named_children()]
    assert sorted(n for n, _, _ in seen["forward"]) == sorted(leaves)
    assert seen["forward"][0] == ("conv1", (2, 3, 8, 8), (2, 16, 8, 8))
    assert seen["backward"][-1] == ("conv1", (2, 16, 8, 8), None)  # input_grad=False reached the stem
    assert numpy.array_equal(out, reference)  # a hook that only watches changes nothing
    assert not any("forward" in vars(m) or "backward" in vars(m) for _, m in model.named_modules())


def test_hooks_nest_and_are_removed_after_an_error(rng):
    layer = nn.ReLU()
    order = []

    def tag(label):
        def hook(name, m, call, arg):
            order.append(label)
            return call(arg)
        return hook

    with pytest.raises(ZeroDivisionError):
        with layer.hooks(forward=tag("outer"), modules=[("relu", layer)]):
            with layer.hooks(forward=tag("inner"), modules=[("relu", layer)]):
                layer(rng.standard_normal(3))
                assert order == ["inner", "outer"]  # the last one added runs first
            layer(rng.standard_normal(3))
            assert order == ["inner", "outer", "outer"]
            1 / 0
    assert "forward" not in vars(layer)
    assert numpy.array_equal(layer(numpy.array([-1.0, 2.0])), [0.0, 2.0])
