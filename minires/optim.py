"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules.

An optimizer reads every gradient of a :class:`~minires.nn.module.Module` and
updates the matching parameter *in place* (layers hold references to their
arrays, so a parameter must never be replaced by a new array). One training
iteration, with every stage visible::

    logits = model(x)
    loss = loss_fn(logits, y)
    model.zero_grad()                    # or opt.zero_grad()
    model.backward(loss_fn.backward())   # fills model.grads
    opt.step()                           # p <- p - lr * update(grad)
    sched.step()                         # lr for the next iteration

The update rules follow ``torch.optim`` exactly (the tests compare them step by
step), so a recipe written for PyTorch means the same thing here.

Schedules are stepped once per *iteration* (optimizer step), not per epoch.
Each one has a pure ``lr_at(iteration)``: iteration 0 is the first optimizer
step, and ``sched.step()`` after iteration ``i`` sets ``opt.lr = lr_at(i + 1)``.

Saving: ``opt.state_dict()`` is a flat ``{str: NumPy array | int | float}``
dict (it fits in an ``.npz``); ``sched.state_dict()`` holds only JSON types.
Loading both back gives a bit-identical continuation of the run.

Every update is written against ``xp = backend.get_array_module(p)``: state
arrays live on the parameter's backend with its dtype, and hyperparameters
are Python floats, so a float32 parameter is never upcast to float64.
"""
import bisect
import math

import numpy

from . import backend, ops


# ---------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------
class Optimizer:
    """What every optimizer shares: the model, ``lr``, the step count, saving.

    Subclasses define

    * ``_per_param`` -- names of the per-parameter state arrays (e.g.
      ``("exp_avg", "exp_avg_sq")``), stored in ``self.state[kind][param_name]``;
    * ``_hyper`` -- names of the scalar hyperparameters saved with the state;
    * ``_update(name, p, g, xp)`` -- the in-place update of one parameter.

    The parameters are looked up from the model at every step (not cached), so
    the optimizer always updates the arrays the model really uses.
    """

    _per_param = ()
    _hyper = ()

    def __init__(self, model, lr):
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.model = model
        self.lr = float(lr)  # read and set by the LR schedules
        self.step_count = 0  # optimizer steps taken so far (t in the equations)
        self.state = {kind: {} for kind in self._per_param}

    def zero_grad(self):
        """Reset every gradient of the model to 0 (``backward`` adds into them)."""
        self.model.zero_grad()

    def step(self):
        """Update every parameter once, in place, from its current gradient."""
        params = self.model.named_parameters()
        grads = self.model.named_grads()
        for name, p in params.items():  # check everything before changing anything
            if grads[name].shape != p.shape:
                raise ValueError(
                    f"gradient of {name!r} has shape {tuple(grads[name].shape)}, "
                    f"expected the parameter's shape {tuple(p.shape)}"
                )
            if grads[name].dtype != p.dtype:
                raise ValueError(
                    f"gradient of {name!r} has dtype {grads[name].dtype}, expected the "
                    f"parameter's dtype {p.dtype} (cast the model with model.astype(...))"
                )
        # A NumPy float64 scalar (e.g. set by a user) would turn float32 updates
        # into float64 temporaries; a Python float never does.
        self.lr = float(self.lr)
        self.step_count += 1
        self._begin_step()
        if self._update_all(params, grads):
            return
        for name, p in params.items():
            g = grads[name]
            self._update(name, p, g, backend.get_array_module(p, g))

    def _begin_step(self):
        """Hook for per-step scalars (Adam's bias corrections)."""

    def _update_all(self, params, grads):
        """Hook: update every parameter at once (SGD's op does); False to go one by one."""
        return False

    def _update(self, name, p, g, xp):
        raise NotImplementedError

    # -- saving and loading -------------------------------------------------
    def state_dict(self):
        """A flat dict: ``lr``, ``step``, the hyperparameters, and one NumPy copy
        of each state array under ``"<kind>.<parameter name>"``, e.g.
        ``"momentum_buffer.layer1.0.conv1.weight"``."""
        out = {"lr": self.lr, "step": self.step_count}
        out.update({h: getattr(self, h) for h in self._hyper})
        for kind, arrays in self.state.items():
            for name, value in arrays.items():
                out[f"{kind}.{name}"] = numpy.array(backend.to_numpy(value), copy=True)
        return out

    def _expected_state_keys(self, step):
        """Per-parameter keys a state saved after ``step`` steps must hold."""
        if step == 0:
            return set()  # state arrays are created by the first step
        names = self.model.named_parameters()
        return {f"{kind}.{name}" for kind in self._per_param for name in names}

    def load_state_dict(self, state):
        """Restore ``lr``, the step count, the hyperparameters and the state arrays.

        ``state`` is what :meth:`state_dict` returned, possibly after a round
        trip through ``numpy.savez`` (scalars then come back as 0-d arrays).
        Missing or unexpected keys raise a KeyError naming them, a wrong shape a
        ValueError; in both cases nothing is changed. Arrays are copied onto the
        backend and dtype of the matching parameter.
        """
        scalars = {"lr", "step", *self._hyper}
        missing = sorted(scalars - set(state))
        if missing:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {missing}")
        step = int(state["step"])
        hyper = {h: _scalar(state[h]) for h in self._hyper}
        expected = scalars | self._expected_state_keys(step)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        params = self.model.named_parameters()
        arrays = {kind: {} for kind in self._per_param}
        for key in sorted(expected - scalars):
            kind, name = key.split(".", 1)
            p, value = params[name], backend.to_numpy(state[key])
            if value.shape != p.shape:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {key!r} has shape "
                    f"{value.shape}, expected {tuple(p.shape)}"
                )
            xp = backend.get_array_module(p)
            arrays[kind][name] = xp.array(value, dtype=p.dtype)  # a copy
        self._check_hyper(hyper)
        self.lr = float(state["lr"])
        self.step_count = step
        for h, value in hyper.items():
            setattr(self, h, value)
        self.state = arrays
        return self

    def _check_hyper(self, hyper):
        """Hook: refuse a state that belongs to another kind of optimizer."""

    def __repr__(self):
        hyper = ", ".join(f"{h}={getattr(self, h)}" for h in self._hyper)
        return f"{type(self).__name__}(lr={self.lr}, {hyper})"


def _scalar(value):
    """A 0-d array (from an .npz) or a Python number -> a Python bool/int/float."""
    value = numpy.asarray(value)
    if value.shape != ():
        raise ValueError(f"expected a scalar, got an array of shape {value.shape}")
    return value.item()


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay.

    Exactly ``torch.optim.SGD`` (with dampening 0). For each parameter ``p``
    with gradient ``grad``, at step ``t = 1, 2, ...``::

        g   = grad + weight_decay * p              # L2 penalty, added to the gradient
        buf = g                         if t == 1  # momentum buffer ("velocity")
        buf = momentum * buf + g        if t > 1
        g   = g + momentum * buf        if nesterov   # look ahead along buf
        g   = buf                       otherwise     (when momentum > 0)
        p   = p - lr * g

    With ``momentum=0`` this is plain SGD, ``p = p - lr * (grad + wd * p)``.
    State: ``state["momentum_buffer"][name]`` (only when ``momentum > 0``).
    """

    _hyper = ("momentum", "weight_decay", "nesterov")

    def __init__(self, model, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self._per_param = ("momentum_buffer",) if self.momentum else ()
        super().__init__(model, lr)

    def _update_all(self, params, grads):
        """All parameters in one call of the sgd_step op (minires/functional/optim.py)."""
        names = list(params)
        buffers = self.state["momentum_buffer"] if self.momentum else {}
        old = [buffers.get(n) for n in names] if buffers else None
        new = ops.sgd_step([params[n] for n in names], [grads[n] for n in names], old,
                           self.lr, self.momentum, self.weight_decay, self.nesterov)
        if self.momentum:
            self.state["momentum_buffer"] = dict(zip(names, new))
        return True

    def load_state_dict(self, state):
        # the set of state arrays depends on the saved momentum, so set it first
        momentum = _scalar(state["momentum"]) if "momentum" in state else self.momentum
        saved = self._per_param
        self._per_param = ("momentum_buffer",) if momentum else ()
        try:
            return super().load_state_dict(state)
        except (KeyError, ValueError):
            self._per_param = saved
            raise


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with L2 weight decay, exactly as ``torch.optim.Adam``.

    For each parameter ``p`` with gradient ``grad``, at step ``t = 1, 2, ...``
    (``m`` and ``v`` start at 0)::

        g     = grad + weight_decay * p                 # L2, added to the gradient
        m     = beta1 * m + (1 - beta1) * g             # running mean of g
        v     = beta2 * v + (1 - beta2) * g * g         # running mean of g^2
        m_hat = m / (1 - beta1**t)                      # bias corrections: m and v
        v_hat = v / (1 - beta2**t)                      #   start at 0, not at E[g]
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)

    computed as PyTorch does, with ``eps`` added after the correction of ``v``:
    ``p -= (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    State: ``state["exp_avg"][name]`` (m) and ``state["exp_avg_sq"][name]`` (v).
    """

    _per_param = ("exp_avg", "exp_avg_sq")
    _hyper = ("beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay")
    decoupled_weight_decay = False  # AdamW sets True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        beta1, beta2 = betas
        for label, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {beta}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        super().__init__(model, lr)

    def _begin_step(self):
        # Python floats, shared by all parameters: no float64 array appears.
        t = self.step_count
        self._step_size = self.lr / (1.0 - self.beta1 ** t)
        self._bias_correction2_sqrt = math.sqrt(1.0 - self.beta2 ** t)

    def _update(self, name, p, g, xp):
        if self.decoupled_weight_decay:
            p *= 1.0 - self.lr * self.weight_decay  # AdamW: shrink p directly
        elif self.weight_decay:
            g = g + self.weight_decay * p
        m = self.state["exp_avg"].get(name)
        if m is None:
            m = self.state["exp_avg"][name] = xp.zeros_like(p)
            self.state["exp_avg_sq"][name] = xp.zeros_like(p)
        v = self.state["exp_avg_sq"][name]
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * (g * g)
        denom = xp.sqrt(v) / self._bias_correction2_sqrt + self.eps
        p -= self._step_size * (m / denom)

    def _check_hyper(self, hyper):
        if bool(hyper["decoupled_weight_decay"]) != self.decoupled_weight_decay:
            saved = "AdamW" if hyper["decoupled_weight_decay"] else "Adam"
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state was saved by {saved}"
            )


class AdamW(Adam):
    """Adam with *decoupled* weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    Instead of adding ``weight_decay * p`` to the gradient (where Adam's
    per-coordinate scaling would also rescale the decay), the parameter is
    shrunk directly before the Adam step::

        p = p * (1 - lr * weight_decay)
        (then the Adam update above, with g = grad)
    """

    decoupled_weight_decay = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ---------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------
class LRSchedule:
    """Sets ``optimizer.lr`` from the iteration number.

    ``base_lr`` is the optimizer's lr when the schedule is built. Building a
    schedule already sets ``optimizer.lr = lr_at(0)`` (the lr of the first
    step); each ``step()``, called once after every optimizer step, moves to
    the next iteration. Subclasses implement the pure ``lr_at(iteration)`` and
    list their settings in ``_config`` (saved and restored with the state).
    """

    _config = ()

    def __init__(self, optimizer, base_lr=None):
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr if base_lr is None else base_lr)
        self.iteration = 0
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, iteration):
        raise NotImplementedError

    def step(self):
        """Advance one iteration and set the optimizer's lr for it."""
        self.iteration += 1
        self.optimizer.lr = self.lr_at(self.iteration)
        return self.optimizer.lr

    def state_dict(self):
        """JSON-friendly: the schedule's name, ``base_lr``, ``iteration`` and settings."""
        out = {"name": type(self).__name__, "base_lr": self.base_lr,
               "iteration": self.iteration}
        for key in self._config:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` saved and set the optimizer's lr to match.

        Wrong or missing keys raise a KeyError naming them, a state of another
        schedule a ValueError; nothing is changed then.
        """
        self._check_keys(state)
        self._load_config(state)
        self.base_lr = float(state["base_lr"])
        self.iteration = int(state["iteration"])
        self.optimizer.lr = self.lr_at(self.iteration)
        return self

    def _check_keys(self, state, extra=()):
        expected = {"name", "base_lr", "iteration", *self._config, *extra}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        if state["name"] != type(self).__name__:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: state is for {state['name']}"
            )

    def _load_config(self, state):
        for key in self._config:
            value = state[key]
            setattr(self, key, tuple(value) if isinstance(value, list) else value)

    def __repr__(self):
        config = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._config)
        return f"{type(self).__name__}(base_lr={self.base_lr}, {config})"


class StepLR(LRSchedule):
    """Multiply the lr by ``gamma`` every ``step_size`` iterations::

        lr(i) = base_lr * gamma ** (i // step_size)
    """

    _config = ("step_size", "gamma")

    def __init__(self, optimizer, step_size, gamma=0.1):
        if int(step_size) != step_size or step_size < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size}")
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer)

    def lr_at(self, iteration):
        return self.base_lr * self.gamma ** (iteration // self.step_size)


class MultiStepLR(LRSchedule):
    """Multiply the lr by ``gamma`` at each milestone iteration::

        lr(i) = base_lr * gamma ** (number of milestones m with m <= i)

    He et al. (2016), CIFAR-10: ``lr=0.1``, divided by 10 at iterations 32k
    and 48k, training stopped at 64k -- see :func:`he2016_cifar`.
    """

    _config = ("milestones", "gamma")

    def __init__(self, optimizer, milestones, gamma=0.1):
        milestones = tuple(int(m) for m in milestones)
        if list(milestones) != sorted(milestones) or len(set(milestones)) != len(milestones):
            raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
        self.milestones, self.gamma = milestones, float(gamma)
        super().__init__(optimizer)

    def lr_at(self, iteration):
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, iteration)


class CosineLR(LRSchedule):
    """Half a cosine from ``base_lr`` down to ``min_lr`` over ``total_steps`` iterations::

        lr(i) = min_lr + (base_lr - min_lr) * (1 + cos(pi * i / total_steps)) / 2

    for ``0 <= i <= total_steps``, and ``min_lr`` after that (PyTorch's
    ``CosineAnnealingLR`` with ``T_max=total_steps``, ``eta_min=min_lr``, for
    the first ``total_steps`` iterations; PyTorch's would then rise again).
    """

    _config = ("total_steps", "min_lr")

    def __init__(self, optimizer, total_steps, min_lr=0.0):
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        self.total_steps, self.min_lr = int(total_steps), float(min_lr)
        super().__init__(optimizer)

    def lr_at(self, iteration):
        progress = min(iteration, self.total_steps) / self.total_steps
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class LinearWarmup(LRSchedule):
    """Ramp the lr linearly up to ``base_lr`` over ``warmup_steps`` iterations,
    then follow the schedule ``after`` (if any), shifted by the warm-up::

        lr(i) = base_lr * (i + 1) / warmup_steps        for i < warmup_steps
        lr(i) = after.lr_at(i - warmup_steps)           for i >= warmup_steps
                (base_lr when after is None)

    The first step uses ``base_lr / warmup_steps`` (small, but not a wasted
    zero step); step ``warmup_steps - 1`` reaches ``base_lr``. Large learning
    rates at the start can blow up a fresh network's activations; a short
    warm-up avoids it (Goyal et al. 2017; He et al. 2016 used lr 0.01 for the
    first ~400 iterations of ResNet-110).

    ``after`` must be built on the same optimizer, *before* the warm-up (so its
    ``base_lr`` is the target lr); only the warm-up is stepped. Example::

        sched = LinearWarmup(opt, 500, after=CosineLR(opt, total_steps=9500))
    """

    _config = ("warmup_steps",)

    def __init__(self, optimizer, warmup_steps, after=None):
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps}")
        if after is not None and after.optimizer is not optimizer:
            raise ValueError("LinearWarmup: `after` must use the same optimizer")
        self.warmup_steps, self.after = int(warmup_steps), after
        # the ramp climbs to the lr the wrapped schedule starts from
        super().__init__(optimizer, base_lr=None if after is None else after.base_lr)

    def lr_at(self, iteration):
        if iteration < self.warmup_steps:
            return self.base_lr * (iteration + 1) / self.warmup_steps
        if self.after is None:
            return self.base_lr
        return self.after.lr_at(iteration - self.warmup_steps)

    def step(self):
        lr = super().step()
        if self.after is not None:  # keep the wrapped schedule's counter meaningful
            self.after.iteration = max(0, self.iteration - self.warmup_steps)
        return lr

    def state_dict(self):
        out = super().state_dict()
        out["after"] = None if self.after is None else self.after.state_dict()
        return out

    def load_state_dict(self, state):
        self._check_keys(state, extra=("after",))
        state = dict(state)
        after = state.pop("after")
        if (after is None) != (self.after is None):
            raise ValueError(
                "LinearWarmup.load_state_dict: the saved warm-up "
                + ("has no" if after is None else "has a")
                + " wrapped schedule `after`, this one "
                + ("has one" if after is None else "has none")
            )
        if after is not None:
            self.after.load_state_dict(after)
        return super().load_state_dict(state)


HE2016_CIFAR_ITERATIONS = 64000  # He et al. 2016, section 4.2: batch 128, 64k iterations


def he2016_cifar(optimizer, total_iterations=HE2016_CIFAR_ITERATIONS):
    """The CIFAR-10 schedule of He et al. (2016), "Deep Residual Learning", sec. 4.2.

    The paper trains with ``SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-4)``,
    batch 128, divides the lr by 10 at 32k and 48k iterations and stops at 64k.
    For a shorter run pass ``total_iterations`` (e.g. ``epochs *
    iterations_per_epoch``): the milestones scale with it, staying at 1/2 and
    3/4 of the run. Returns a :class:`MultiStepLR` whose ``total_iterations``
    attribute says where to stop (the schedule itself keeps the last lr).
    """
    total = int(total_iterations)
    if total != total_iterations or total < 4:
        raise ValueError(f"total_iterations must be an integer >= 4, got {total_iterations}")
    sched = MultiStepLR(optimizer, milestones=(total // 2, total * 3 // 4), gamma=0.1)
    sched.total_iterations = total
    return sched
