"""The datasets minires knows, and :func:`load_dataset` to get them as arrays.

Normalization statistics (``mean``, ``std``) are per channel, in units of
``pixel / 255``, over *all* pixels of the *training* set; ``std`` is the
population standard deviation (ddof=0). A batch is normalized as
``(x / 255 - mean) / std``.

* Fashion-MNIST: computed here from the real training files
  (``/usr/share/datasets/fashion-mnist``, payload checksums verified):
  mean 0.2860406, std 0.3530242.
* MNIST: the widely published values for its training set, 0.1307 and 0.3081
  (MNIST is not on the machine this was written on, so not recomputed).
* CIFAR-10: the widely published per-channel values of its training set,
  mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616). (A second set of
  "std" values, (0.2023, 0.1994, 0.2010), also circulates: it is the mean of
  per-image standard deviations, not the dataset's std.)
"""
import hashlib
from dataclasses import dataclass

import numpy

from . import download as _download
from .cifar import read_cifar10
from .errors import DataError
from .idx import read_bytes, read_idx_pair


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a data loader need to know about a dataset."""
    name: str
    num_classes: int
    channels: int
    image_size: int          # images are image_size x image_size
    mean: tuple              # per channel, in [0, 1] units (see module docstring)
    std: tuple
    class_names: tuple
    hflip: bool              # is a horizontal flip label-preserving? (not for digits)
    train_size: int
    test_size: int

    @property
    def image_shape(self):
        """``(C, H, W)`` of one image."""
        return (self.channels, self.image_size, self.image_size)


DATASETS = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, mean=(0.2860406,), std=(0.3530242,),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        hflip=True, train_size=60000, test_size=10000),
    "mnist": DatasetInfo(
        "mnist", 10, 1, 28, mean=(0.1307,), std=(0.3081,),
        class_names=tuple(str(d) for d in range(10)),
        hflip=False, train_size=60000, test_size=10000),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        class_names=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
        hflip=True, train_size=50000, test_size=10000),
}


def get_info(name):
    """The :class:`DatasetInfo` of ``name``; ValueError listing the known names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}: known datasets are "
                         f"{', '.join(sorted(DATASETS))}") from None


def _check(info, split, images, labels, source, labels_source=None):
    """Shapes, dtypes and label range must match ``info``: never a wrong answer."""
    expected = (len(labels),) + info.image_shape
    if images.dtype != numpy.uint8 or images.shape != expected:
        raise DataError(f"{source}: {info.name} {split} images must be uint8 {expected}, "
                        f"found {images.dtype} {images.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{labels_source or source}: {info.name} labels must be in 0..{info.num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")


def load_dataset(name, data_dir=None, download=True, verify=True, progress=True, return_files=False):
    """Load a dataset as NumPy arrays on the host.

    Args:
        name:     ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.
        data_dir: the folder to read from; if it lacks the files that is an
                  error, never a fall back to another copy (see
                  :mod:`minires.data.download` for the search order without it).
        download: if the files are nowhere, download them into the user cache
                  (False: raise FileNotFoundError naming every place searched).
        verify:   check the files' SHA-256 against the published values
                  (IDX: the decompressed content; CIFAR: the tarball). Set False
                  to load your own files in the same format.
        progress: show a progress bar while downloading.
        return_files: also return the list of files read (see :func:`files_banner`):
                  one dict per file, ``{"role", "path", "sha256", "of", "verified"}``,
                  where ``sha256`` is the digest of ``of`` ("decompressed content"
                  or "file") and ``verified`` says whether it matched the
                  published value.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images uint8 NCHW
        ``(N, 1, 28, 28)`` or ``(N, 3, 32, 32)``, labels int64 ``(N,)``;
        with ``return_files``: ``((x_train, y_train, x_test, y_test), files)``.
    """
    info = get_info(name)
    source = _download.SOURCES[name]
    paths = _download.locate(name, data_dir=data_dir, download=download, progress=progress)
    files = []
    if name == "cifar10":
        remote = source.files[0]
        path = paths[remote.name]
        digest = None
        if path.is_file():
            digest = _download.sha256_of(path)
            if verify and digest != remote.sha256:
                raise DataError(f"{path}: SHA-256 is {digest}, expected {remote.sha256}: the "
                                "file is damaged or not the official archive (verify=False "
                                "skips this check)")
        x_train, y_train, x_test, y_test = read_cifar10(path)
        where = {"train": str(path), "test": str(path), "train labels": str(path), "test labels": str(path)}
        files.append({"role": "train and test", "path": str(path), "sha256": digest,
                      "of": "file" if digest else "extracted folder (not checked)",
                      "verified": bool(verify and digest)})
    else:
        published = {f.name: f for f in source.files}
        roles = {"train-images-idx3-ubyte.gz": "train images", "train-labels-idx1-ubyte.gz": "train labels",
                 "t10k-images-idx3-ubyte.gz": "test images", "t10k-labels-idx1-ubyte.gz": "test labels"}

        def pair(images_name, labels_name):
            sums = [published[n].payload_sha256 if verify else None for n in (images_name, labels_name)]
            return read_idx_pair(paths[images_name], paths[labels_name], *sums)

        x_train, y_train = pair("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
        x_test, y_test = pair("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
        for file_name, role in roles.items():
            path = paths[file_name]
            # verified: read_idx compared the digest with the published one and
            # would have raised; otherwise compute it, so the record still pins the data.
            digest = (published[file_name].payload_sha256 if verify
                      else hashlib.sha256(read_bytes(path)).hexdigest())
            files.append({"role": role, "path": str(path), "sha256": digest,
                          "of": "decompressed content", "verified": bool(verify)})
        where = {"train": str(paths["train-images-idx3-ubyte.gz"]),
                 "test": str(paths["t10k-images-idx3-ubyte.gz"]),
                 "train labels": str(paths["train-labels-idx1-ubyte.gz"]),
                 "test labels": str(paths["t10k-labels-idx1-ubyte.gz"])}
    _check(info, "train", x_train, y_train, where["train"], where["train labels"])
    _check(info, "test", x_test, y_test, where["test"], where["test labels"])
    arrays = (x_train, y_train, x_test, y_test)
    return (arrays, files) if return_files else arrays


def files_banner(name, files, roles=None):
    """The lines a run prints to say which files it read, e.g.::

        data: fashion-mnist, SHA-256 of each file's decompressed content matches the published value
          train images  /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz  sha256 c59f468a2f67...

    ``roles``: only the files with these roles (e.g. the test files, for ``evaluate``).
    """
    shown = [f for f in files if roles is None or f["role"] in roles]
    if all(f["verified"] for f in shown):
        how = f"SHA-256 of each file's {shown[0]['of']} matches the published value" if shown else ""
    else:
        how = "NOT verified against the published checksums (verify=False or an extracted folder)"
    width = max((len(f["role"]) for f in shown), default=0)
    lines = [f"data: {name}, {how}"]
    for f in shown:
        digest = f"sha256 {f['sha256'][:12]}..." if f["sha256"] else f["of"]
        lines.append(f"  {f['role']:<{width}}  {f['path']}  {digest}")
    return "\n".join(lines)


def subset(images, labels, n, seed=0, stratified=True):
    """A reproducible subset of ``n`` examples, e.g. for ``--subset N``.

    Stratified (the default): every class keeps its share of the data,
    ``n_c = n * count_c / N`` rounded so the counts add up to ``n`` (largest
    remainders get the extra examples); within a class the examples are drawn
    at random. Not stratified: ``n`` examples drawn at random. The chosen
    examples keep their original order.

    Returns ``(images[idx], labels[idx])``.
    """
    labels = numpy.asarray(labels)
    total = len(labels)
    if len(images) != total:
        raise ValueError(f"subset: {len(images)} images but {total} labels")
    if not 1 <= n <= total:
        raise ValueError(f"subset: n must be in 1..{total}, got {n}")
    rng = numpy.random.default_rng(seed)
    if not stratified:
        idx = rng.choice(total, size=n, replace=False)
    else:
        classes, counts = numpy.unique(labels, return_counts=True)
        share = n * counts / total
        take = numpy.floor(share).astype(int)
        extra = n - take.sum()
        take[numpy.argsort(-(share - take), kind="stable")[:extra]] += 1
        idx = numpy.concatenate([
            rng.choice(numpy.flatnonzero(labels == c), size=k, replace=False)
            for c, k in zip(classes, take)])
    idx = numpy.sort(idx)
    return images[idx], labels[idx]
