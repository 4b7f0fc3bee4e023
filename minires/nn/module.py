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
"""
import numpy

from .. import backend


class Module:
    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True
        self.cache = None

    # -- forward / backward -------------------------------------------------
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def pop_cache(self):
        """Return the cache saved by ``forward`` and forget it.

        A cache is used by exactly one backward: calling backward before forward,
        or twice after one forward, is a bug in the caller and raises.
        """
        if self.cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a matching forward "
                "(call forward first; each forward allows one backward)"
            )
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
        if dtype is not None and x.dtype != dtype:
            raise ValueError(
                f"{self!r}: expected {dtype} input (the module's dtype), got {x.dtype}; "
                f"convert with x.astype({str(dtype)!r}) or module.astype(...)"
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
        for g in self.named_grads().values():
            g.fill(0)

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
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        for name, target in targets.items():
            shape = tuple(numpy.shape(state[name]))
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
