"""Optimizers and LR schedules: parity with torch.optim, saving/resuming, dtypes."""
import io
import json
import math

import numpy as np
import pytest

from minires import optim
from minires.nn.module import Module

DTYPES = [np.float64, np.float32]

# name -> (minires constructor, torch constructor), same hyperparameters
OPTIMIZERS = {
    "sgd": (lambda m: optim.SGD(m, lr=0.1),
            lambda t, ps: t.optim.SGD(ps, lr=0.1)),
    "sgd_momentum_wd": (lambda m: optim.SGD(m, lr=0.05, momentum=0.9, weight_decay=1e-2),
                        lambda t, ps: t.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "nesterov_wd": (lambda m: optim.SGD(m, lr=0.05, momentum=0.8, weight_decay=5e-3,
                                        nesterov=True),
                    lambda t, ps: t.optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=5e-3,
                                              nesterov=True)),
    "adam": (lambda m: optim.Adam(m, lr=1e-2),
             lambda t, ps: t.optim.Adam(ps, lr=1e-2)),
    "adam_wd": (lambda m: optim.Adam(m, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                lambda t, ps: t.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                           weight_decay=0.1)),
    "adamw": (lambda m: optim.AdamW(m, lr=1e-2, weight_decay=0.1),
              lambda t, ps: t.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
}


class Leaf(Module):
    def __init__(self, rng, dtype):
        super().__init__()
        self.add_param("weight", rng.standard_normal((3, 4)).astype(dtype))
        self.add_param("bias", rng.standard_normal(3).astype(dtype))


class Tiny(Module):
    """Two leaves, so parameter names are dotted ("block.weight") as in a ResNet."""

    def __init__(self, dtype=np.float64, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.add_param("scale", rng.standard_normal((2, 1, 3)).astype(dtype))
        self.block = Leaf(rng, dtype)
        self.head = Leaf(rng, dtype)


def gradient_sequence(model, n_steps, seed=1):
    """n_steps dicts name -> random gradient (the same sequence for every run)."""
    rng = np.random.default_rng(seed)
    params = model.named_parameters()
    return [{k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}
            for _ in range(n_steps)]


def run_steps(opt, grads, sched=None):
    """Feed the given gradients to ``opt`` (as a backward pass would), one step each."""
    for step_grads in grads:
        opt.zero_grad()
        for name, g in opt.model.named_grads().items():
            g += step_grads[name]
        opt.step()
        if sched is not None:
            sched.step()


def snapshot(model):
    return {k: p.copy() for k, p in model.named_parameters().items()}


# -- parity with torch.optim -------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_matches_torch(name, dtype, kernels):
    torch = pytest.importorskip("torch")
    make_ours, make_torch = OPTIMIZERS[name]
    model = Tiny(dtype)
    tparams = {k: torch.tensor(p.copy(), requires_grad=True)
               for k, p in model.named_parameters().items()}
    opt, topt = make_ours(model), make_torch(torch, list(tparams.values()))
    grads = gradient_sequence(model, n_steps=6)

    run_steps(opt, grads)
    for step_grads in grads:
        for k, t in tparams.items():
            t.grad = torch.tensor(step_grads[k])
        topt.step()

    for k, p in model.named_parameters().items():
        assert p.dtype == dtype
        expected = tparams[k].detach().numpy()
        assert expected.dtype == dtype
        if dtype == np.float64:
            np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-6, err_msg=k)
    # the parameters really moved (a no-op optimizer would fail above, but be explicit)
    assert not np.allclose(model.named_parameters()["block.weight"],
                           Tiny(dtype).named_parameters()["block.weight"])


def test_sgd_by_hand():
    """Two momentum steps written out: buf1 = g1, buf2 = m*buf1 + g2."""
    model = Tiny()
    p0 = snapshot(model)
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    g1, g2 = gradient_sequence(model, 2)
    run_steps(opt, [g1, g2])
    for k, p in model.named_parameters().items():
        expected = p0[k] - 0.1 * g1[k] - 0.1 * (0.9 * g1[k] + g2[k])
        np.testing.assert_allclose(p, expected, rtol=1e-14, atol=1e-14)


def test_step_leaves_gradients_untouched():
    model = Tiny()
    opt = optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    grads = gradient_sequence(model, 1)
    run_steps(opt, grads)
    for k, g in model.named_grads().items():
        np.testing.assert_array_equal(g, grads[0][k])


def test_parameters_updated_in_place():
    model = Tiny()
    arrays = {k: id(p) for k, p in model.named_parameters().items()}
    opt = optim.AdamW(model, lr=0.1)
    run_steps(opt, gradient_sequence(model, 2))
    assert {k: id(p) for k, p in model.named_parameters().items()} == arrays


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float32_stays_float32(name):
    model = Tiny(np.float32)
    opt = OPTIMIZERS[name][0](model)
    opt.lr = np.float64(opt.lr)  # a NumPy float64 lr must not upcast anything either
    run_steps(opt, gradient_sequence(model, 3))
    for p in model.named_parameters().values():
        assert p.dtype == np.float32
    for key, value in opt.state_dict().items():
        if isinstance(value, np.ndarray):
            assert value.dtype == np.float32, key


def test_wrong_gradient_shape_is_an_error_and_changes_nothing():
    model = Tiny()
    opt = optim.SGD(model, lr=0.1)
    before = snapshot(model)
    model.head.grads["weight"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"head\.weight.*\(4, 3\).*\(3, 4\)"):
        opt.step()
    for k, p in model.named_parameters().items():
        np.testing.assert_array_equal(p, before[k])
    assert opt.step_count == 0


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=0.1, momentum=-0.5),
                                    dict(lr=0.1, nesterov=True),
                                    dict(lr=0.1, weight_decay=-1.0)])
def test_sgd_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        optim.SGD(Tiny(), **kwargs)


def test_adam_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(Tiny(), betas=(1.0, 0.999))


# -- saving and resuming -----------------------------------------------------
def npz_round_trip(state):
    """What a checkpoint does: np.savez, then np.load(allow_pickle=False)."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_is_bit_identical(name, dtype):
    make = OPTIMIZERS[name][0]
    grads = gradient_sequence(Tiny(dtype), n_steps=7)

    # uninterrupted: 7 steps with a schedule
    model = Tiny(dtype)
    opt = make(model)
    run_steps(opt, grads, optim.StepLR(opt, step_size=2, gamma=0.5))

    # interrupted after 3 steps, saved, restored into fresh objects, continued
    first = Tiny(dtype)
    opt1 = make(first)
    sched1 = optim.StepLR(opt1, step_size=2, gamma=0.5)
    run_steps(opt1, grads[:3], sched1)
    model_state = npz_round_trip(first.state_dict())
    opt_state = npz_round_trip(opt1.state_dict())
    sched_state = json.loads(json.dumps(sched1.state_dict()))

    resumed = Tiny(dtype, seed=99)  # different initial weights, overwritten by the load
    resumed.load_state_dict(model_state)
    opt2 = make(resumed)
    sched2 = optim.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert opt2.step_count == 3 and opt2.lr == opt1.lr
    run_steps(opt2, grads[3:], sched2)

    for k, p in model.named_parameters().items():
        np.testing.assert_array_equal(resumed.named_parameters()[k], p, err_msg=k)
    assert opt2.lr == opt.lr and opt2.step_count == opt.step_count == 7


def test_state_dict_is_flat_and_named():
    model = Tiny(np.float32)
    opt = optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert set(opt.state_dict()) == {"lr", "step", "momentum", "weight_decay", "nesterov"}
    run_steps(opt, gradient_sequence(model, 1))
    state = opt.state_dict()
    assert state["step"] == 1 and state["lr"] == 0.1
    buffers = {k for k in state if k.startswith("momentum_buffer.")}
    assert buffers == {"momentum_buffer." + k for k in model.named_parameters()}
    assert "momentum_buffer.block.weight" in buffers
    # a copy: later steps do not change a saved state
    saved = state["momentum_buffer.block.weight"].copy()
    run_steps(opt, gradient_sequence(model, 1, seed=5))
    np.testing.assert_array_equal(state["momentum_buffer.block.weight"], saved)

    adam = optim.Adam(model)
    run_steps(adam, gradient_sequence(model, 1))
    kinds = {k.split(".", 1)[0] for k in adam.state_dict() if "." in k}
    assert kinds == {"exp_avg", "exp_avg_sq"}


def test_load_state_dict_errors_name_the_keys():
    model = Tiny()
    opt = optim.Adam(model)
    run_steps(opt, gradient_sequence(model, 2))
    state = opt.state_dict()

    broken = dict(state)
    del broken["exp_avg.head.bias"]
    broken["exp_avg.nothere"] = np.zeros(3)
    fresh = optim.Adam(Tiny())
    with pytest.raises(KeyError, match=r"exp_avg\.head\.bias.*exp_avg\.nothere"):
        fresh.load_state_dict(broken)
    assert fresh.step_count == 0 and fresh.state == {"exp_avg": {}, "exp_avg_sq": {}}

    broken = dict(state, **{"exp_avg_sq.block.weight": np.zeros((4, 3))})
    with pytest.raises(ValueError, match=r"exp_avg_sq\.block\.weight.*\(4, 3\).*\(3, 4\)"):
        fresh.load_state_dict(broken)

    with pytest.raises(KeyError, match="beta1"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "beta1"})
    with pytest.raises(ValueError, match="saved by Adam"):
        optim.AdamW(Tiny()).load_state_dict(state)
    with pytest.raises(KeyError):  # an Adam state is not an SGD state
        optim.SGD(Tiny(), lr=0.1, momentum=0.9).load_state_dict(state)


# -- schedules -----------------------------------------------------------------
def lr_sequence(sched, n):
    """The lr used by each of the first n iterations."""
    lrs = []
    for _ in range(n):
        lrs.append(sched.optimizer.lr)
        sched.step()
    return lrs


def torch_lr_sequence(torch, make_sched, lr, n):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_sched(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("case", ["step", "multistep", "cosine", "cosine_min"])
def test_schedules_match_torch(case):
    torch = pytest.importorskip("torch")
    lr_sched = torch.optim.lr_scheduler
    ours, theirs = {
        "step": (lambda o: optim.StepLR(o, step_size=3, gamma=0.5),
                 lambda o: lr_sched.StepLR(o, step_size=3, gamma=0.5)),
        "multistep": (lambda o: optim.MultiStepLR(o, milestones=[4, 9, 10], gamma=0.1),
                      lambda o: lr_sched.MultiStepLR(o, milestones=[4, 9, 10], gamma=0.1)),
        "cosine": (lambda o: optim.CosineLR(o, total_steps=12),
                   lambda o: lr_sched.CosineAnnealingLR(o, T_max=12)),
        "cosine_min": (lambda o: optim.CosineLR(o, total_steps=12, min_lr=0.01),
                       lambda o: lr_sched.CosineAnnealingLR(o, T_max=12, eta_min=0.01)),
    }[case]
    n = 13  # iterations 0..12, the cosine's whole half period
    expected = torch_lr_sequence(torch, theirs, 0.1, n)
    got = lr_sequence(ours(optim.SGD(Tiny(), lr=0.1)), n)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert len(set(np.round(got, 12))) > 2  # the lr really changed


def test_lr_at_is_pure_and_matches_step():
    opt = optim.SGD(Tiny(), lr=0.2)
    sched = optim.MultiStepLR(opt, milestones=[2, 5])
    assert [sched.lr_at(i) for i in (5, 0, 2, 1)] == pytest.approx([0.002, 0.2, 0.02, 0.2])
    assert sched.iteration == 0 and opt.lr == 0.2
    assert lr_sequence(sched, 7) == [sched.lr_at(i) for i in range(7)]


def test_cosine_ends_at_min_lr_and_stays():
    sched = optim.CosineLR(optim.SGD(Tiny(), lr=1.0), total_steps=10, min_lr=0.1)
    assert sched.lr_at(0) == 1.0
    assert sched.lr_at(5) == pytest.approx(0.55)
    assert sched.lr_at(10) == pytest.approx(0.1) and sched.lr_at(50) == pytest.approx(0.1)


def test_linear_warmup_ramp():
    opt = optim.SGD(Tiny(), lr=0.4)
    sched = optim.LinearWarmup(opt, warmup_steps=4)
    assert opt.lr == pytest.approx(0.1)  # set for the very first step
    assert lr_sequence(sched, 6) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_linear_warmup_then_cosine():
    opt = optim.SGD(Tiny(), lr=0.4)
    cosine = optim.CosineLR(opt, total_steps=4)
    sched = optim.LinearWarmup(opt, warmup_steps=2, after=cosine)
    lrs = lr_sequence(sched, 8)
    expected = [0.2, 0.4] + [0.2 * (1 + math.cos(math.pi * k / 4)) for k in range(5)] + [0.0]
    assert lrs == pytest.approx(expected, abs=1e-15)
    assert cosine.iteration == 6  # the wrapped schedule's counter follows, shifted


def test_warmup_with_other_optimizer_is_an_error():
    after = optim.StepLR(optim.SGD(Tiny(), lr=0.1), step_size=2)
    with pytest.raises(ValueError, match="same optimizer"):
        optim.LinearWarmup(optim.SGD(Tiny(), lr=0.1), 3, after=after)


def test_he2016_recipe():
    opt = optim.SGD(Tiny(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = optim.he2016_cifar(opt)
    assert sched.milestones == (32000, 48000) and sched.total_iterations == 64000
    assert [sched.lr_at(i) for i in (0, 31999, 32000, 47999, 48000, 63999)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    short = optim.he2016_cifar(optim.SGD(Tiny(), lr=0.1), total_iterations=2 * 469)
    assert short.milestones == (469, 703) and short.total_iterations == 938


@pytest.mark.parametrize("make", [
    lambda o: optim.StepLR(o, step_size=3, gamma=0.5),
    lambda o: optim.MultiStepLR(o, milestones=[2, 6]),
    lambda o: optim.CosineLR(o, total_steps=10, min_lr=1e-3),
    lambda o: optim.LinearWarmup(o, 3),
    lambda o: optim.LinearWarmup(o, 3, after=optim.MultiStepLR(o, milestones=[2, 4])),
])
def test_schedule_state_round_trip(make):
    opt = optim.SGD(Tiny(), lr=0.1)
    sched = make(opt)
    lr_sequence(sched, 5)
    state = json.loads(json.dumps(sched.state_dict()))  # JSON-friendly

    opt2 = optim.SGD(Tiny(), lr=0.7)  # another base lr: the state wins
    sched2 = make(opt2)
    sched2.load_state_dict(state)
    assert opt2.lr == opt.lr and sched2.iteration == 5
    assert lr_sequence(sched2, 8) == lr_sequence(sched, 8)


def test_schedule_load_errors():
    opt = optim.SGD(Tiny(), lr=0.1)
    state = optim.StepLR(opt, step_size=3).state_dict()
    with pytest.raises(KeyError, match="step_size"):
        optim.StepLR(opt, step_size=3).load_state_dict(
            {k: v for k, v in state.items() if k != "step_size"})
    multistep = optim.MultiStepLR(opt, milestones=[1]).state_dict()
    with pytest.raises(ValueError, match="state is for MultiStepLR"):
        optim.StepLR(opt, step_size=3).load_state_dict(
            {**state, "name": multistep["name"]})


# -- CuPy ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sgd_momentum_wd", "nesterov_wd", "adam_wd", "adamw"])
def test_cupy_matches_numpy(name):
    from minires import backend
    if not backend.cupy_available():
        pytest.skip("needs CuPy and a GPU")
    import cupy

    make = OPTIMIZERS[name][0]
    host = Tiny(np.float64)
    device = Tiny(np.float64)
    for _, module in device.named_modules():  # move every array to the GPU
        module.params = {k: cupy.asarray(v) for k, v in module.params.items()}
        module.grads = {k: cupy.asarray(v) for k, v in module.grads.items()}
    grads = gradient_sequence(host, n_steps=4)
    opt_host, opt_device = make(host), make(device)
    run_steps(opt_host, grads)
    run_steps(opt_device, [{k: cupy.asarray(g) for k, g in step.items()} for step in grads])
    for k, p in device.named_parameters().items():
        assert isinstance(p, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(p), host.named_parameters()[k],
                                   rtol=1e-12, atol=1e-12)

    state = opt_device.state_dict()  # NumPy on the host, ready for an .npz
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if "." in k)
    opt_device.load_state_dict(npz_round_trip(state))
    assert all(isinstance(a, cupy.ndarray)
               for arrays in opt_device.state.values() for a in arrays.values())


@pytest.mark.gpu
def test_cupy_sgd_step_that_fails_leaves_no_velocity():
    """A float32 gradient for a float64 parameter is refused before anything changes:
    no momentum buffer is kept (a later step would read garbage)."""
    from minires import backend
    if not backend.cupy_available():
        pytest.skip("needs CuPy and a GPU")
    import cupy

    model = Tiny(np.float64)
    for _, module in model.named_modules():
        module.params = {k: cupy.asarray(v) for k, v in module.params.items()}
        module.grads = {k: cupy.asarray(v).astype(np.float32) for k, v in module.grads.items()}
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="has dtype float32, expected the parameter's dtype float64"):
        opt.step()
    assert opt.state["momentum_buffer"] == {}


@pytest.mark.gpu
def test_cupy_one_launch_paths_fall_back_where_they_cannot_apply(rng):
    """zero_grad with mixed gradient dtypes, and SGD with one array registered under two
    names (tied weights), go array by array on a GPU as on the CPU: same results."""
    from minires import backend
    if not backend.cupy_available():
        pytest.skip("needs CuPy and a GPU")
    import cupy

    def tied(xp):
        model = Tiny(np.float64)
        shared = xp.asarray(rng.normal(size=(3,)))
        modules = [m for _, m in model.named_modules() if m.params]
        for m in modules[:2]:
            m.params = dict(m.params, tied=shared)
            m.grads = dict(m.grads, tied=xp.zeros(3))
        return model, shared

    results = []
    for xp in (np, cupy):
        state = rng.bit_generator.state
        model, shared = tied(xp)
        rng.bit_generator.state = state
        for _, module in model.named_modules():
            module.params = {k: xp.asarray(v) if k != "tied" else v for k, v in module.params.items()}
            module.grads = {k: xp.asarray(v) if k != "tied" else v for k, v in module.grads.items()}
        opt = optim.SGD(model, lr=0.1, momentum=0.9)
        for g in model.named_grads().values():
            g[...] = 1.0
        opt.step()
        opt.step()
        results.append(backend.to_numpy(shared))
        first = next(iter(model.named_grads().values()))
        module = next(m for _, m in model.named_modules() if m.grads)
        module.grads[next(iter(module.grads))] = first.astype(np.float32)  # mixed dtypes now
        model.zero_grad()
        assert all(float(abs(g).sum()) == 0 for g in model.named_grads().values())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12)
