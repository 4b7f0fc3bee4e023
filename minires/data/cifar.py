"""Reader for CIFAR-10 in its official Python format (``cifar-10-python.tar.gz``).

The archive holds a folder ``cifar-10-batches-py/`` with the members
``data_batch_1`` ... ``data_batch_5`` (training, 10000 images each),
``test_batch`` (10000 images) and ``batches.meta`` (class names; not needed
here). Each batch is a Python 2 pickle (protocol 2) of a dict::

    b"data":   uint8 array (10000, 3072) -- per row, 1024 red, then 1024 green,
               then 1024 blue values of a 32x32 image in row-major order
    b"labels": list of 10000 ints in 0..9

so ``data.reshape(-1, 3, 32, 32)`` is already NCHW.

**Why a restricted unpickler.** Loading a pickle can call any function the file
names (``os.system`` included): a tampered archive would run code on the
reader's machine. :class:`SafeUnpickler` allows only the handful of globals
needed to rebuild dicts, lists, bytes and NumPy arrays, and refuses the rest.

The reader also accepts the extracted folder ``cifar-10-batches-py/``.
"""
import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy

from .errors import DataError

try:  # NumPy >= 2 moved numpy.core to numpy._core; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

FOLDER = "cifar-10-batches-py"
TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_MEMBER = "test_batch"
NUM_CLASSES = 10
ROW_SIZE = 3 * 32 * 32


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` limited to latin-1: how protocol-2 pickles made by
    Python 3 store ``bytes`` objects."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, "
                                     f"{encoding!r}): only latin-1 text is expected")
    return codecs.encode(text, "latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild only plain containers and NumPy arrays.

    Plain dicts, lists, tuples, ints, floats, bytes and strings need no globals
    at all. The globals below are the complete list needed for a NumPy array:
    ``_reconstruct(ndarray, shape, dtype)`` then ``__setstate__`` with the raw
    bytes. Any other ``module.name`` in the stream raises UnpicklingError
    before it is imported, let alone called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,   # Python 2 / NumPy 1
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,  # NumPy 2
        ("numpy", "ndarray"): numpy.ndarray,
        ("numpy", "dtype"): numpy.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': a CIFAR batch needs only "
                "NumPy arrays, lists and bytes (a file naming other globals could run "
                "code when unpickled)") from None


def safe_loads(data):
    """Unpickle ``data`` with :class:`SafeUnpickler` (Python 2 str -> bytes)."""
    return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


def parse_batch(data, source):
    """Decode one pickled batch into ``(images uint8 (N,3,32,32), labels int64 (N,))``.

    ``source`` names the file and member in error messages.
    """
    try:
        batch = safe_loads(data)
    except pickle.UnpicklingError as err:
        raise DataError(f"{source}: {err}") from err
    except Exception as err:  # a truncated/garbled stream fails in many ways
        raise DataError(f"{source}: not a valid pickled CIFAR batch "
                        f"({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{source}: expected a pickled dict, found {type(batch).__name__}")
    # The official files have bytes keys; accept str keys from re-pickled copies.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{source}: missing key 'data' or 'labels' "
                        f"(found {sorted(map(str, batch))})")
    images, labels = batch["data"], batch["labels"]
    if not isinstance(images, numpy.ndarray) or images.dtype != numpy.uint8 \
            or images.ndim != 2 or images.shape[1] != ROW_SIZE:
        found = (f"{images.dtype} {images.shape}" if isinstance(images, numpy.ndarray)
                 else type(images).__name__)
        raise DataError(f"{source}: 'data' must be a uint8 array (N, {ROW_SIZE}), "
                        f"found {found}")
    try:
        labels = numpy.asarray(labels, dtype=numpy.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"{source}: 'labels' is not a list of integers ({err})") from err
    if labels.shape != (len(images),):
        raise DataError(f"{source}: {len(images)} images but labels of shape "
                        f"{labels.shape}: the counts must match")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{source}: labels must be in 0..{NUM_CLASSES - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    # copy: an array rebuilt from pickled bytes may be read-only
    return images.reshape(-1, 3, 32, 32).copy(), labels


def _read_members_from_archive(path, names):
    """``{name: bytes}`` for the wanted members of a (gzipped) tar archive.

    Members are read in archive order, in one pass; nothing is extracted to disk.
    """
    wanted = {f"{FOLDER}/{name}": name for name in names}
    found = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupted archive "
                        f"({type(err).__name__}: {err}); delete it and download it again") from err
    missing = [f"{FOLDER}/{n}" for n in names if n not in found]
    if missing:
        raise DataError(f"{path}: archive lacks member(s) {', '.join(missing)}; "
                        "is this cifar-10-python.tar.gz?")
    return found


def _read_members_from_folder(folder, names):
    """``{name: bytes}`` from an extracted ``cifar-10-batches-py`` folder."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing file(s) {', '.join(missing)}")
    return {n: (folder / n).read_bytes() for n in names}


def read_cifar10(path):
    """Load CIFAR-10 from the archive or from its extracted folder.

    Args:
        path: ``cifar-10-python.tar.gz`` or a ``cifar-10-batches-py`` folder.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images uint8 (N, 3, 32, 32),
        labels int64 (N,) in 0..9 (50000 train / 10000 test in the real data).
    """
    path = Path(path)
    names = TRAIN_MEMBERS + (TEST_MEMBER,)
    if path.is_dir():
        members = _read_members_from_folder(path, names)
        where = {n: f"{path / n}" for n in names}
    else:
        members = _read_members_from_archive(path, names)
        where = {n: f"{path} (member {FOLDER}/{n})" for n in names}
    train = [parse_batch(members[n], where[n]) for n in TRAIN_MEMBERS]
    x_test, y_test = parse_batch(members[TEST_MEMBER], where[TEST_MEMBER])
    x_train = numpy.concatenate([x for x, _ in train])
    y_train = numpy.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test
