"""``Module``: the base class every layer and network derives from.

A module holds three dictionaries of its *own* arrays:

* ``params``  -- learnable arrays (``weight``, ``bias``), updated in place by optimizers;
* ``grads``   -- one gradient per parameter, same names and shapes; ``backward``
  *adds* into them (call ``zero_grad`` between steps, as in PyTorch);
* ``buffers`` -- state that is saved but not learned (BatchNorm's running stats).

Child modules are ordinary attributes (``self.conv1 = Conv2d(...)``); they are
found in the order they were assigned, which gives PyTorch's dotted names
(``layer1.0.conv1.weight``).

Subclasses implement ``forward(x)`` (keeping in ``self.cache`` what backward
needs) and ``backward(dout) -> dx``.

Tools that watch a model run (the summary table, bench's per-layer timing,
the gradient-flow recorder, the NaN finder) use ``Module.hooks``: for the
length of a ``with`` block, a function of theirs runs around chosen modules'
forward or backward.
"""
import contextlib

import numpy

from .. import backend, ops


class CacheError(RuntimeError):
    """``backward`` without a matching ``forward`` (or a second one after it)."""


def check_sizes(owner, minimum=1, **sizes):
    """Raise a ValueError unless every size is an int (or a tuple of ints) >= minimum.

    Used by constructors, so ``Conv2d(3, 0, 3)`` fails at once with a clear
    message instead of later with a ZeroDivisionError in the initializer.
    """
    for name, value in sizes.items():
        values = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, (int, numpy.integer)) and not isinstance(v, bool) and v >= minimum
                   for v in values):
            what = "a pair of integers" if isinstance(value, tuple) else "an integer"
            raise ValueError(f"{owner}: {name} must be {what} >= {minimum}, got {value!r}")


def _few(names, limit=8):
    """The first ``limit`` names, and how many more (a whole ResNet's keys would fill the screen)."""
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def _hooked(hook, name, module, call):
    """``call`` (a bound method, or an outer hook's wrapper) with ``hook`` around it."""
    def run(arg, **options):  # options such as ResNet.backward's input_grad pass through
        return hook(name, module, lambda a: call(a, **options), arg)
    return run


class Module:
    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True
        self.cache = None

    # -- forward / backward -------------------------------------------------
    def __call__(self, x):
        try:
            return self.forward(x)
        except (ValueError, TypeError) as err:
            self._name_failing_layer(err)
            raise

    def _name_failing_layer(self, err):
        """Prefix an error raised inside this module with the dotted name of the
        layer that raised it (``"layer2.0.conv1: Conv2d(...): expected ..."``).

        The innermost module records itself on the error; every enclosing module
        rewrites the message with the longer name it knows, so the outermost one
        (the model) leaves the full path. A direct call on a layer adds nothing.
        """
        if not hasattr(err, "minires_layer"):
            err.minires_layer, err.minires_message = self, str(err)
        for name, module in self.named_modules():
            if module is err.minires_layer and name:
                err.args = (f"{name}: {err.minires_message}",)
                return

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    @contextlib.contextmanager
    def hooks(self, forward=None, backward=None, modules=None):
        """Inside the ``with`` block, run ``forward`` around each module's forward
        and ``backward`` around its backward; everything is restored on exit.

        A hook is called as ``hook(name, module, call, arg)`` and returns what the
        method should return; ``call(arg)`` runs the method itself. For example,
        print every leaf's output shape::

            def show(name, module, call, x):
                out = call(x)
                print(name, out.shape)
                return out

            with model.hooks(forward=show):
                model(x)

        ``modules`` is a list of ``(name, module)`` pairs (default: the leaves of
        this tree, the modules without children). Hooks nest: a second ``with``
        wraps around the first.
        """
        if modules is None:
            modules = [(name, m) for name, m in self.named_modules() if not m.named_children()]
        saved = []  # (module, method name, its own instance attribute or None)
        try:
            for method, hook in (("forward", forward), ("backward", backward)):
                if hook is None:
                    continue
                for name, m in modules:
                    saved.append((m, method, vars(m).get(method)))
                    # an instance attribute shadows the class's method: the one place that does so
                    setattr(m, method, _hooked(hook, name, m, getattr(m, method)))
            yield self
        finally:
            for m, method, own in reversed(saved):
                if own is None:
                    vars(m).pop(method, None)
                else:
                    setattr(m, method, own)

    def pop_cache(self):
        """Return the cache saved by ``forward`` and forget it.

        A cache is used by exactly one backward: calling backward before forward,
        or twice after one forward, is a bug in the caller and raises.
        """
        if self.cache is None:
            err = CacheError(f"{type(self).__name__}.backward called without a matching forward "
                             "(call forward first; each forward allows one backward)")
            err.minires_layer, err.minires_message = self, str(err)  # ResNet/Sequential.backward prefix its path
            raise err
        cache, self.cache = self.cache, None
        return cache

    def check_input(self, x, shape, dtype=None):
        """Raise a ValueError naming this module if ``x`` does not fit.

        ``shape`` is the expected shape with ``None`` for free dimensions,
        e.g. ``(None, 64, None, None)`` for NCHW with 64 channels. ``dtype``,
        if given, must match exactly: a float64 batch must not silently turn
        a float32 network into float64 (or the reverse).
        """
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{self!r}: expected an array, got {type(x).__name__}")
        fits = x.ndim == len(shape) and all(e is None or e == a for e, a in zip(shape, x.shape))
        if not fits:
            expected = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            raise ValueError(f"{self!r}: expected input of shape {expected}, got {tuple(x.shape)}")
        if x.dtype.kind != "f":
            # integer images (uint8 pixels) must be scaled to floats first; an int
            # array would otherwise overflow, truncate, or fail deep inside an op
            raise ValueError(f"{self!r}: expected a floating-point input, got {x.dtype}; "
                             "convert with x.astype('float32')")
        if dtype is not None and x.dtype != dtype:
            raise ValueError(
                f"{self!r}: expected {dtype} input (the module's dtype), got {x.dtype}; "
                f"convert with x.astype({str(dtype)!r}) or module.astype(...)"
            )

    def check_window(self, x, kernel, padding):
        """Raise a ValueError naming this module if the padded input (H + 2 ph,
        W + 2 pw) is smaller than the kernel: not even one window would fit."""
        (kh, kw), (ph, pw) = kernel, padding
        H, W = x.shape[-2:]
        if H + 2 * ph < kh or W + 2 * pw < kw:
            raise ValueError(
                f"{self!r}: expected an input of at least {max(kh - 2 * ph, 1)}x{max(kw - 2 * pw, 1)} "
                f"pixels (kernel {kh}x{kw}, padding {ph}x{pw}), got shape {tuple(x.shape)}"
            )

    def check_dout(self, dout, expected):
        """Raise a ValueError naming this module unless ``dout`` has the shape of
        the forward's output (broadcasting would otherwise give a wrong gradient)."""
        if tuple(dout.shape) != tuple(expected):
            raise ValueError(
                f"{self!r}.backward: expected dout of shape {tuple(expected)} (the forward's "
                f"output), got {tuple(dout.shape)}"
            )

    def add_param(self, name, value):
        """Register a learnable array and its zero gradient."""
        self.params[name] = value
        self.grads[name] = backend.get_array_module(value).zeros_like(value)

    # -- the module tree ----------------------------------------------------
    def named_children(self):
        """``(name, module)`` for each direct child, in assignment order."""
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def named_modules(self, prefix=""):
        """Every module of the tree (self first), with dotted names."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _named(self, what):
        out = {}
        for prefix, module in self.named_modules():
            for name, value in getattr(module, what).items():
                out[f"{prefix}.{name}" if prefix else name] = value
        return out

    def named_parameters(self):
        """dict name -> parameter array (the live arrays, not copies)."""
        return self._named("params")

    def named_grads(self):
        """dict name -> gradient array, with the same names as ``named_parameters``."""
        return self._named("grads")

    def named_buffers(self):
        return self._named("buffers")

    def num_parameters(self):
        return sum(int(p.size) for p in self.named_parameters().values())

    def zero_grad(self):
        """Set every gradient to 0 (``backward`` adds into them)."""
        ops.zero_grads(list(self.named_grads().values()))

    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    # -- saving and loading -------------------------------------------------
    def state_dict(self):
        """Parameters and buffers as NumPy copies, with torchvision's key names."""
        state = {k: backend.to_numpy(v).copy() for k, v in self.named_parameters().items()}
        state.update({k: backend.to_numpy(v).copy() for k, v in self.named_buffers().items()})
        return state

    def load_state_dict(self, state):
        """Copy ``state`` (name -> array) into this module's parameters and buffers.

        Every key must be present exactly once with the right shape; otherwise a
        KeyError / ValueError names the offending keys, and nothing is changed.
        """
        targets = {**self.named_parameters(), **self.named_buffers()}
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {_few(missing)}, "
                f"unexpected keys {_few(unexpected)} (a checkpoint of another model?)"
            )
        for name, target in targets.items():
            value = state[name]
            dtype = value.dtype if hasattr(value, "dtype") else numpy.asarray(value).dtype
            if dtype.kind not in "biuf":  # e.g. strings: checked now, or half the model loads
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {name!r} holds {dtype} values, expected numbers"
                )
            shape = tuple(numpy.shape(value))
            if shape != tuple(target.shape):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {name!r} has shape {shape}, "
                    f"expected {tuple(target.shape)}"
                )
        xp = backend.get_array_module(*targets.values())
        for name, target in targets.items():
            value = state[name]
            if backend.get_array_module(value) is not xp:
                value = xp.asarray(backend.to_numpy(value))
            target[...] = value  # in place: optimizers keep referencing the same arrays
        return self

    def astype(self, dtype):
        """Cast every floating parameter, gradient and buffer to ``dtype``; returns self."""
        for _, module in self.named_modules():
            for store in (module.params, module.grads, module.buffers):
                for name, value in store.items():
                    if value.dtype.kind == "f":
                        store[name] = value.astype(dtype)
        return self

    def __repr__(self):
        children = self.named_children()
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines + [")"])

    def extra_repr(self):
        return ""
