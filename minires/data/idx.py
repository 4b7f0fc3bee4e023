"""Reader for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a tiny header followed by a C-ordered array, big-endian::

    bytes 0-1   0x00 0x00                  (always zero)
    byte  2     dtype code                 (0x08 = uint8, see _IDX_DTYPES)
    byte  3     ndim                       (1 for labels, 3 for images)
    ndim x 4    each dimension, uint32     (e.g. 60000, 28, 28)
    rest        prod(dims) items of dtype  -- nothing more, nothing less

Read as one big-endian uint32, bytes 0-3 are the *magic number*: 2049
(0x00000801) for a label file, 2051 (0x00000803) for an image file.

The files are usually gzipped (``train-images-idx3-ubyte.gz``); we recognise gzip
by its first two bytes, not by the file name, so a raw file named ``.gz`` (or
the other way round) still loads. Every check failure raises
:class:`~minires.data.errors.DataError` naming the file and what is wrong:
a half-downloaded file must never turn into a silently shorter dataset.
"""
import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy

from .errors import ChecksumError, DataError

GZIP_MAGIC = b"\x1f\x8b"

# dtype code -> big-endian NumPy dtype (the codes of the original MNIST page).
_IDX_DTYPES = {
    0x08: numpy.dtype(">u1"),
    0x09: numpy.dtype(">i1"),
    0x0B: numpy.dtype(">i2"),
    0x0C: numpy.dtype(">i4"),
    0x0D: numpy.dtype(">f4"),
    0x0E: numpy.dtype(">f8"),
}


def read_bytes(path):
    """The content of ``path``, decompressed if it is gzip.

    A truncated or corrupted gzip stream raises DataError naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path}: truncated or corrupted gzip file ({err}); "
                        "delete it and download it again") from err


def parse_idx(data, source="<bytes>"):
    """Decode IDX bytes into a NumPy array in native byte order.

    ``source`` names the file in error messages. The payload must be exactly
    ``prod(dims) * itemsize`` bytes long.
    """
    if len(data) < 4:
        raise DataError(f"{source}: not an IDX file (only {len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        magic = struct.unpack(">I", data[:4])[0]
        raise DataError(
            f"{source}: bad IDX magic number 0x{magic:08x} (expected 0x0000TTNN with "
            f"a dtype code TT in {sorted(hex(c) for c in _IDX_DTYPES)} and NN >= 1 "
            "dimensions, e.g. 0x00000803 for images); is this an IDX file?")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{source}: header cut short ({len(data)} bytes, "
                        f"{ndim} dimensions need {header_size})")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[code]
    expected = int(numpy.prod(dims, dtype=numpy.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "extra bytes"
        raise DataError(f"{source}: payload is {actual} bytes but the header {dims} of "
                        f"{dtype.name} needs {expected} ({problem})")
    array = numpy.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native order, writable copy


def read_idx(path, ndim=None, sha256=None):
    """Read one IDX file (gzip or raw) into a NumPy array.

    Args:
        path:   the file.
        ndim:   if given, the number of dimensions the file must have
                (3 for an image file, 1 for a label file).
        sha256: if given, the SHA-256 hex digest the *decompressed* content must
                have (independent of how the file was gzipped).
    """
    path = Path(path)
    data = read_bytes(path)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ChecksumError(
                f"{path}: SHA-256 of the decompressed content is {actual}, expected "
                f"{sha256}: the file is damaged or belongs to another dataset")
    array = parse_idx(data, source=str(path))
    if ndim is not None and array.ndim != ndim:
        kind = {1: "a label file", 3: "an image file"}.get(ndim, f"{ndim}-d")
        raise DataError(f"{path}: expected {kind} ({ndim} dimensions), "
                        f"found shape {array.shape}")
    return array


def read_idx_pair(images_path, labels_path, images_sha256=None, labels_sha256=None):
    """Read an image file and its label file; returns ``(images, labels)``.

    Images come back as uint8 ``(N, 1, H, W)`` (NCHW with one channel), labels as
    int64 ``(N,)``. The two files must hold the same number of examples.
    """
    images = read_idx(images_path, ndim=3, sha256=images_sha256)
    labels = read_idx(labels_path, ndim=1, sha256=labels_sha256)
    for path, array in ((images_path, images), (labels_path, labels)):
        if array.dtype != numpy.uint8:
            raise DataError(f"{path}: expected uint8 data, found {array.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                        f"holds {len(labels)} labels: the counts must match")
    return images[:, None, :, :], labels.astype(numpy.int64)
