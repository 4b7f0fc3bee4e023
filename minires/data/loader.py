"""Mini-batches: shuffling, augmentation, normalization, transfer to the device.

One epoch of a :class:`DataLoader`, batch by batch::

    order = rng.permutation(N)                 # shuffle=True: a new order each epoch
    idx   = order[i : i + batch_size]
    x     = images[idx]                        # uint8 (B, C, H, W), on the host
    x     = random_crop(pad(x, 4)), random_flip(x)          # augment=True only
    x     = to_device(x)                       # uint8 moves: 4x less than float32
    x     = (x / 255 - mean) / std             # float32, on the active backend
    y     = to_device(labels[idx])             # int64

All randomness (the order and the augmentation) comes from the loader's own
``numpy.random.Generator``: the same seed gives the same batches, and
:meth:`DataLoader.get_state` / :meth:`DataLoader.set_state` save and restore
it between epochs, so a resumed run sees the batches an uninterrupted run
would have seen.
"""
import copy
import math

import numpy

from .. import backend


def pad_and_crop(images, offsets, pad):
    """Random-crop ``images`` after zero-padding them by ``pad`` pixels per side.

    Args:
        images:  uint8 (B, C, H, W).
        offsets: int (B, 2), the top-left corner (dy, dx) of each crop in the
                 padded image, each in 0..2*pad.
        pad:     padding width.

    Returns (B, C, H, W): ``out[b] = padded[b, :, dy:dy+H, dx:dx+W]``. One fancy
    index gathers every crop at once -- no Python loop over images.
    """
    b, c, h, w = images.shape
    padded = numpy.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = offsets[:, 0, None] + numpy.arange(h)   # (B, H): padded row of each output row
    cols = offsets[:, 1, None] + numpy.arange(w)   # (B, W)
    return padded[numpy.arange(b)[:, None, None, None],
                  numpy.arange(c)[None, :, None, None],
                  rows[:, None, :, None],
                  cols[:, None, None, :]]


def hflip(images, flip):
    """Mirror left-right the images where ``flip`` (bool (B,)) is True."""
    return numpy.where(flip[:, None, None, None], images[..., ::-1], images)


class DataLoader:
    """Iterate over ``(x, y)`` mini-batches of an in-memory dataset.

    Args:
        images:     uint8 NumPy array (N, C, H, W), pixel values 0..255.
        labels:     integer NumPy array (N,).
        batch_size: examples per batch (the last batch may be smaller).
        shuffle:    draw a new random order every epoch.
        seed:       seed of the loader's generator; None seeds it from the
                    shared generator ``minires.backend.rng()`` (so
                    ``backend.manual_seed`` makes it reproducible too).
        drop_last:  skip the last batch if it is smaller than ``batch_size``.
        augment:    training augmentation: zero-pad by ``pad`` and crop back at
                    a random offset, and (if ``flip``) mirror half the images.
        mean, std:  per-channel statistics in [0, 1] units (sequences of length
                    C, or scalars); None means 0 and 1.
        pad, flip:  augmentation settings (defaults: 4 pixels, flips on; turn
                    flips off for digits, see ``DatasetInfo.hflip``).

    Each batch is ``x`` float32 (B, C, H, W) equal to ``(images/255 - mean)/std``
    and ``y`` int64 (B,), both arrays of the *active* backend (CuPy arrays on the
    GPU when the backend is ``cupy``). ``len(loader)`` is the number of batches.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, seed=None,
                 drop_last=False, augment=False, mean=None, std=None, pad=4, flip=True):
        if not isinstance(images, numpy.ndarray) or not isinstance(labels, numpy.ndarray):
            raise TypeError("DataLoader wants NumPy arrays on the host, got "
                            f"{type(images).__name__} and {type(labels).__name__} "
                            "(use minires.backend.to_numpy to bring arrays back)")
        if images.ndim != 4 or images.dtype != numpy.uint8:
            raise ValueError("DataLoader: images must be uint8 (N, C, H, W), "
                             f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),) or not numpy.issubdtype(labels.dtype, numpy.integer):
            raise ValueError(f"DataLoader: labels must be integers of shape ({len(images)},), "
                             f"got {labels.dtype} {labels.shape}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive integer, got {batch_size}")
        if augment and (int(pad) != pad or pad < 0):
            raise ValueError(f"DataLoader: pad must be a non-negative integer, got {pad}")
        self.images = images
        self.labels = labels.astype(numpy.int64, copy=False)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.pad = int(pad)
        self.flip = flip
        channels = images.shape[1]
        self.mean = self._per_channel(mean, 0.0, channels, "mean")
        self.std = self._per_channel(std, 1.0, channels, "std")
        if numpy.any(self.std <= 0):
            raise ValueError(f"DataLoader: std must be positive, got {self.std.ravel()}")
        if seed is None:
            seed = int(backend.rng().integers(2**63))
        self.rng = numpy.random.default_rng(seed)

    @staticmethod
    def _per_channel(value, default, channels, what):
        """``value`` as float32 (1, C, 1, 1), ready to broadcast over a batch."""
        value = numpy.asarray(default if value is None else value, dtype=numpy.float32)
        if value.ndim == 0:
            value = numpy.full(channels, value, dtype=numpy.float32)
        if value.shape != (channels,):
            raise ValueError(f"DataLoader: {what} needs one value per channel "
                             f"({channels}), got shape {value.shape}")
        return value.reshape(1, channels, 1, 1)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self):
        """Examples per epoch (fewer than N when ``drop_last`` drops some)."""
        return len(self) * self.batch_size if self.drop_last else len(self.images)

    def get_state(self):
        """The generator state, JSON-serializable (a dict of str and int).

        Save it *between* epochs (the next epoch's order is drawn when
        iteration starts); :meth:`set_state` with it replays that epoch.
        """
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_state(self, state):
        """Restore a state returned by :meth:`get_state` (also after a JSON round trip)."""
        expected = type(self.rng.bit_generator).__name__
        if not isinstance(state, dict) or state.get("bit_generator") != expected:
            raise ValueError(f"DataLoader.set_state: expected a {expected} state dict from "
                             f"get_state(), got {state!r:.200}")
        self.rng.bit_generator.state = copy.deepcopy(state)

    def _augment(self, x):
        """Pad-and-random-crop, then random horizontal flip, for a uint8 batch."""
        b = len(x)
        offsets = self.rng.integers(0, 2 * self.pad + 1, size=(b, 2))
        x = pad_and_crop(x, offsets, self.pad)
        if self.flip:
            x = hflip(x, self.rng.random(b) < 0.5)
        return x

    def __iter__(self):
        n = len(self.images)
        order = self.rng.permutation(n) if self.shuffle else numpy.arange(n)
        stop = len(self) * self.batch_size if self.drop_last else n
        xp = backend.get_backend()
        mean = backend.to_device(self.mean)
        std = backend.to_device(self.std)
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = self._augment(x)
            x = backend.to_device(x)
            x = (x.astype(xp.float32) / 255 - mean) / std
            y = backend.to_device(self.labels[idx])
            yield x, y
