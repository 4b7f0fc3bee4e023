"""Data for minires: MNIST, Fashion-MNIST and CIFAR-10, and mini-batches.

::

    from minires.data import DATASETS, DataLoader, load_dataset

    x_train, y_train, x_test, y_test = load_dataset("fashion-mnist")  # uint8 NCHW, int64
    info = DATASETS["fashion-mnist"]
    train = DataLoader(x_train, y_train, batch_size=128, shuffle=True, seed=0,
                       augment=True, flip=info.hflip, mean=info.mean, std=info.std)
    for x, y in train:          # float32 (128, 1, 28, 28), int64 (128,), active backend
        ...

Modules: :mod:`.idx` (IDX reader), :mod:`.cifar` (CIFAR-10 reader with a safe
unpickler), :mod:`.download` (search order, checksums, downloads),
:mod:`.datasets` (dataset facts, :func:`load_dataset`, :func:`subset`),
:mod:`.loader` (:class:`DataLoader`).
"""
from .datasets import DATASETS, DatasetInfo, files_banner, get_info, load_dataset, subset
from .download import SOURCES, cache_dir, download_file, locate, search_dirs
from .errors import ChecksumError, DataError, DownloadError
from .loader import DataLoader

__all__ = [
    "DATASETS", "DatasetInfo", "files_banner", "get_info", "load_dataset", "subset",
    "SOURCES", "cache_dir", "download_file", "locate", "search_dirs",
    "ChecksumError", "DataError", "DownloadError", "DataLoader",
]
