"""Tests for minires.data: IDX and CIFAR readers, search/download, DataLoader.

Every data file here is written by the test itself (tiny IDX files, a tiny
CIFAR tarball in the official pickle format); the real Fashion-MNIST is used
when the Debian package ``dataset-fashion-mnist`` is installed.
"""
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy
import pytest

from minires import backend
from minires.data import (DATASETS, ChecksumError, DataError, DataLoader, DownloadError,
                          download_file, files_banner, load_dataset, locate, search_dirs, subset)
from minires.data import download as dl
from minires.data.cifar import read_cifar10
from minires.data.idx import read_idx, read_idx_pair
from minires.data.loader import hflip, pad_and_crop

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No MINIRES_DATA, and a user cache inside tmp_path (never the real one)."""
    monkeypatch.delenv("MINIRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# -- helpers: writing files in the official formats ---------------------------

def idx_bytes(array):
    """The IDX encoding of a uint8 array (header + payload)."""
    array = numpy.asarray(array, dtype=numpy.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_file(path, data, gz):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def tiny_mnist(folder, n_train=12, n_test=5, seed=0, gz=True):
    """Write four tiny MNIST-format files into ``folder``; returns the arrays."""
    rng = numpy.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=numpy.uint8)
        labels = rng.integers(0, 10, size=n, dtype=numpy.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte" + (".gz" if gz else "")
            write_file(folder / name, idx_bytes(array), gz)
        arrays[split] = (images, labels)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Pickles the way Python 2 wrote the CIFAR batches: protocol 2, every str
    and bytes as a Python 2 ``str`` (BINSTRING), NumPy's module as numpy.core."""

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(n, rng):
    data = rng.integers(0, 256, size=(n, 3072), dtype=numpy.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"tiny batch", b"labels": labels, b"data": data,
            b"filenames": [b"img%d.png" % i for i in range(n)]}


def write_cifar(path, batches, py2=True, extra=None):
    """Write ``{member name: dict}`` as a cifar-10-python.tar.gz-style archive."""
    with tarfile.open(path, "w:gz") as tar:
        members = dict(batches, **(extra or {}))
        for name, obj in members.items():
            data = obj if isinstance(obj, bytes) else (
                py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2))
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tiny_cifar_batches(n=4, seed=0):
    rng = numpy.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(n, rng) for name in names}
    batches["batches.meta"] = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n}
    return batches


# -- IDX ------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arrays = tiny_mnist(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images, labels = read_idx_pair(tmp_path / f"train-images-idx3-ubyte{suffix}",
                                   tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert images.shape == (12, 1, 28, 28) and images.dtype == numpy.uint8
    assert labels.shape == (12,) and labels.dtype == numpy.int64
    numpy.testing.assert_array_equal(images[:, 0], arrays["train"][0])
    numpy.testing.assert_array_equal(labels, arrays["train"][1])


def test_idx_other_dtypes_and_gzip_detected_by_content(tmp_path):
    values = (numpy.arange(6).reshape(2, 3) - 3).astype(">i4")  # big-endian, as IDX stores it
    data = struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">2I", 2, 3) + values.tobytes()
    path = write_file(tmp_path / "raw-but-named.gz", data, gz=False)
    out = read_idx(path)
    assert out.dtype == numpy.int32 and out.dtype.isnative
    numpy.testing.assert_array_equal(out, values)
    gz_path = write_file(tmp_path / "gzipped-without-suffix", data, gz=True)
    numpy.testing.assert_array_equal(read_idx(gz_path), values)


def test_idx_truncated_gzip(tmp_path):
    data = gzip.compress(idx_bytes(numpy.zeros((50, 28, 28))))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"idx3-ubyte\.gz.*truncated or corrupted gzip"):
        read_idx(path)


def test_idx_corrupted_gzip(tmp_path):
    data = bytearray(gzip.compress(idx_bytes(numpy.arange(5000) % 256)))
    data[len(data) // 2] ^= 0xFF                    # a flipped byte: CRC or inflate fails
    path = tmp_path / "broken.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"broken\.gz"):
        read_idx(path)


def test_idx_wrong_magic(tmp_path):
    path = write_file(tmp_path / "notidx.gz", b"PK\x03\x04" + bytes(100), gz=True)
    with pytest.raises(DataError, match=r"notidx\.gz.*bad IDX magic number 0x504b0304"):
        read_idx(path)
    path = write_file(tmp_path / "badcode", struct.pack(">HBB", 0, 0x07, 1) + bytes(8), gz=False)
    with pytest.raises(DataError, match="badcode.*magic"):
        read_idx(path)


@pytest.mark.parametrize("delta, word", [(-1, "truncated"), (+3, "extra bytes")])
def test_idx_payload_size_must_match_header(tmp_path, delta, word):
    data = idx_bytes(numpy.zeros((4, 28, 28)))
    data = data[:delta] if delta < 0 else data + bytes(delta)
    path = write_file(tmp_path / "t10k-images-idx3-ubyte.gz", data, gz=True)
    with pytest.raises(DataError, match=rf"t10k-images-idx3-ubyte\.gz: payload .*{word}"):
        read_idx(path)


def test_idx_header_cut_short(tmp_path):
    path = write_file(tmp_path / "short", struct.pack(">HBB", 0, 8, 3) + b"\x00\x00", gz=False)
    with pytest.raises(DataError, match="short: header cut short"):
        read_idx(path)


def test_idx_count_mismatch(tmp_path):
    images = write_file(tmp_path / "img.gz", idx_bytes(numpy.zeros((5, 28, 28))), gz=True)
    labels = write_file(tmp_path / "lab.gz", idx_bytes(numpy.zeros(4)), gz=True)
    with pytest.raises(DataError, match=r"img\.gz holds 5 images but .*lab\.gz holds 4 labels"):
        read_idx_pair(images, labels)


def test_idx_files_swapped(tmp_path):
    images = write_file(tmp_path / "img.gz", idx_bytes(numpy.zeros((5, 28, 28))), gz=True)
    labels = write_file(tmp_path / "lab.gz", idx_bytes(numpy.zeros(5)), gz=True)
    with pytest.raises(DataError, match=r"lab\.gz: expected an image file"):
        read_idx_pair(labels, images)


def test_idx_payload_checksum(tmp_path):
    data = idx_bytes(numpy.arange(10))
    path = write_file(tmp_path / "lab.gz", data, gz=True)
    good = hashlib.sha256(data).hexdigest()
    numpy.testing.assert_array_equal(read_idx(path, sha256=good), numpy.arange(10))
    with pytest.raises(ChecksumError, match=r"lab\.gz: SHA-256 .* expected 0{64}"):
        read_idx(path, sha256="0" * 64)


# -- real Fashion-MNIST (Debian package dataset-fashion-mnist) ---------------------

@pytest.fixture(scope="module")
def fashion():
    if not all((FASHION_DIR / name).exists() for name in IDX_NAMES):
        pytest.skip(f"Fashion-MNIST not installed in {FASHION_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
    return load_dataset("fashion-mnist", download=False)  # verify=True: payload SHA-256


def test_fashion_mnist_real_files(fashion):
    x_train, y_train, x_test, y_test = fashion
    assert x_train.shape == (60000, 1, 28, 28) and x_train.dtype == numpy.uint8
    assert x_test.shape == (10000, 1, 28, 28) and x_test.dtype == numpy.uint8
    assert y_train.dtype == numpy.int64 and y_test.dtype == numpy.int64
    # balanced classes 0..9, and the first labels of the published files
    numpy.testing.assert_array_equal(numpy.bincount(y_train), [6000] * 10)
    numpy.testing.assert_array_equal(numpy.bincount(y_test), [1000] * 10)
    numpy.testing.assert_array_equal(y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    # the normalization constants recorded in DATASETS come from these files
    info = DATASETS["fashion-mnist"]
    pixels = x_train.astype(numpy.float64) / 255
    assert pixels.mean() == pytest.approx(info.mean[0], abs=1e-6)
    assert pixels.std() == pytest.approx(info.std[0], abs=1e-6)


def test_fashion_mnist_known_checksum(fashion):
    # Independent of the package's code: torchvision's published MD5 of the
    # decompressed train labels, and the SHA-256 recorded in SOURCES.
    raw = gzip.decompress((FASHION_DIR / "train-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "9018921c3c673c538a1fc5bad174d6f9"
    recorded = {f.name: f for f in dl.SOURCES["fashion-mnist"].files}
    assert hashlib.sha256(raw).hexdigest() == recorded["train-labels-idx1-ubyte.gz"].payload_sha256


# -- CIFAR-10 -------------------------------------------------------------------

@pytest.mark.parametrize("py2", [True, False], ids=["python2-style", "python3-protocol2"])
def test_cifar_tiny_tarball(tmp_path, py2):
    batches = tiny_cifar_batches(n=4)
    write_cifar(tmp_path / "cifar-10-python.tar.gz", batches, py2=py2)
    x_train, y_train, x_test, y_test = load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert x_train.shape == (20, 3, 32, 32) and x_train.dtype == numpy.uint8
    assert x_test.shape == (4, 3, 32, 32)
    assert y_train.dtype == numpy.int64 and y_train.shape == (20,)
    # rows are 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    row = batches["data_batch_2"][b"data"][1]
    numpy.testing.assert_array_equal(x_train[5, 0], row[:1024].reshape(32, 32))
    numpy.testing.assert_array_equal(x_train[5, 2], row[2048:].reshape(32, 32))
    expected = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    numpy.testing.assert_array_equal(y_train, expected)
    numpy.testing.assert_array_equal(y_test, batches["test_batch"][b"labels"])


def test_cifar_extracted_folder(tmp_path):
    batches = tiny_cifar_batches(n=3)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, obj in batches.items():
        (folder / name).write_bytes(py2_pickle(obj))
    x_train, y_train, x_test, y_test = load_dataset("cifar10", data_dir=tmp_path)
    assert x_train.shape == (15, 3, 32, 32) and y_test.shape == (3,)
    numpy.testing.assert_array_equal(x_test.reshape(3, -1), batches["test_batch"][b"data"])


def test_cifar_verify_rejects_unofficial_archive(tmp_path):
    write_cifar(tmp_path / "cifar-10-python.tar.gz", tiny_cifar_batches())
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: SHA-256 .*verify=False"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Evil:
    """Unpickling this calls os.system: what a tampered archive would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("py2", [True, False])
def test_cifar_malicious_pickle_refused(tmp_path, py2):
    marker = tmp_path / "pwned"
    batches = tiny_cifar_batches()
    batches["data_batch_3"] = {b"data": _Evil(marker), b"labels": [0]}
    path = write_cifar(tmp_path / "cifar-10-python.tar.gz", batches, py2=py2)
    with pytest.raises(DataError, match=r"data_batch_3.*refusing .* '(posix|os)\.system'"):
        read_cifar10(path)
    assert not marker.exists()


def test_cifar_codecs_encode_only_latin1(tmp_path):
    # _codecs.encode is allowed (Python 3 protocol-2 bytes), but only as latin-1.
    payload = (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13\x86R.")
    batches = tiny_cifar_batches()
    batches["test_batch"] = payload
    path = write_cifar(tmp_path / "c.tar.gz", batches)
    with pytest.raises(DataError, match="only latin-1"):
        read_cifar10(path)


@pytest.mark.parametrize("bad, message", [
    ({b"data": numpy.zeros((2, 3072), numpy.uint8), b"labels": [0, 10]},
     r"labels must be in 0\.\.9"),
    ({b"data": numpy.zeros((2, 3072), numpy.uint8), b"labels": [0]}, "counts must match"),
    ({b"data": numpy.zeros((2, 1024), numpy.uint8), b"labels": [0, 1]}, r"uint8 array \(N, 3072\)"),
    ({b"data": numpy.zeros((2, 3072), numpy.float32), b"labels": [0, 1]}, "found float32"),
    ({b"labels": [0, 1]}, "missing key"),
    ([1, 2, 3], "expected a pickled dict"),
])
def test_cifar_bad_batch(tmp_path, bad, message):
    batches = tiny_cifar_batches()
    batches["data_batch_4"] = bad
    path = write_cifar(tmp_path / "cifar-10-python.tar.gz", batches)
    where = r"cifar-10-python\.tar\.gz \(member cifar-10-batches-py/data_batch_4\): "
    with pytest.raises(DataError, match=where + ".*" + message):
        read_cifar10(path)


def test_cifar_truncated_and_incomplete_archives(tmp_path):
    path = write_cifar(tmp_path / "cifar-10-python.tar.gz", tiny_cifar_batches(n=50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"python\.tar\.gz: truncated or corrupted archive"):
        read_cifar10(path)
    batches = tiny_cifar_batches()
    del batches["test_batch"]
    write_cifar(path, batches)
    with pytest.raises(DataError, match="lacks member.*cifar-10-batches-py/test_batch"):
        read_cifar10(path)
    path.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="truncated or corrupted archive"):
        read_cifar10(path)


# -- search order, download ----------------------------------------------------

def sha256_hex(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_download_file_url(tmp_path):
    src = write_file(tmp_path / "src.bin", os.urandom(3_000_000), gz=False)
    dest = tmp_path / "cache" / "file.bin"
    out = download_file(src.as_uri(), dest, sha256_hex(src), progress=False)
    assert out == dest and dest.read_bytes() == src.read_bytes()
    assert os.listdir(dest.parent) == ["file.bin"]          # no temp file left


def test_download_checksum_mismatch_leaves_no_file(tmp_path):
    src = write_file(tmp_path / "src.bin", b"evil content", gz=False)
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(ChecksumError, match="SHA-256 of the download is .* expected 0{64}"):
        download_file(src.as_uri(), dest, "0" * 64, progress=False)
    assert os.listdir(dest.parent) == []
    # an existing good file is never replaced by unverified content
    dest.write_bytes(b"good")
    with pytest.raises(ChecksumError):
        download_file(src.as_uri(), dest, "0" * 64, progress=False)
    assert dest.read_bytes() == b"good" and os.listdir(dest.parent) == ["file.bin"]


def test_download_interrupted_leaves_no_file(tmp_path, monkeypatch):
    class Response(io.BytesIO):
        headers = {"Content-Length": str(3 << 20)}

        def read(self, size=-1):
            if self.tell() >= 1 << 20:
                raise KeyboardInterrupt       # Ctrl-C in the middle of the stream
            return super().read(size)

    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda *a, **k: Response(bytes(3 << 20)))
    dest = tmp_path / "cache" / "big.bin"
    with pytest.raises(KeyboardInterrupt):
        download_file("https://example.invalid/big.bin", dest, "0" * 64, progress=False)
    assert os.listdir(dest.parent) == []


def test_download_tries_mirrors(tmp_path):
    src = write_file(tmp_path / "src.bin", b"content", gz=False)
    missing = (tmp_path / "nowhere" / "src.bin").as_uri()
    dest = tmp_path / "cache" / "f"
    download_file([missing, src.as_uri()], dest, sha256_hex(src), progress=False)
    assert dest.read_bytes() == b"content"
    with pytest.raises(DownloadError, match=r"could not download g:\n.*nowhere"):
        download_file([missing], tmp_path / "cache" / "g", sha256_hex(src), progress=False)


def fake_source(monkeypatch, name, mirror_dir, system_dirs=()):
    """Point SOURCES[name] at tiny IDX files in ``mirror_dir`` (with their checksums)."""
    files = tuple(
        dataclasses.replace(f, sha256=sha256_hex(mirror_dir / f.name),
                            payload_sha256=hashlib.sha256(
                                gzip.decompress((mirror_dir / f.name).read_bytes())).hexdigest())
        for f in dl.SOURCES[name].files)
    source = dataclasses.replace(dl.SOURCES[name], files=files, mirrors=(mirror_dir.as_uri(),),
                                 system_dirs=tuple(str(d) for d in system_dirs))
    monkeypatch.setitem(dl.SOURCES, name, source)


def test_load_dataset_downloads_into_cache(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    arrays = tiny_mnist(mirror, seed=3)
    fake_source(monkeypatch, "mnist", mirror)
    x_train, y_train, x_test, y_test = load_dataset("mnist", progress=False)
    numpy.testing.assert_array_equal(x_test[:, 0], arrays["t10k"][0])
    numpy.testing.assert_array_equal(y_train, arrays["train"][1])
    cache = tmp_path / "xdg-cache" / "minires" / "mnist"
    assert sorted(os.listdir(cache)) == sorted(IDX_NAMES)
    # the second time it comes from the cache, mirror or not
    for f in mirror.iterdir():
        f.unlink()
    numpy.testing.assert_array_equal(load_dataset("mnist", download=False)[3], y_test)


def test_load_dataset_download_fails_clearly(tmp_path, monkeypatch):
    fake_source(monkeypatch, "mnist", (lambda d: (tiny_mnist(d), d)[1])(tmp_path / "m"))
    monkeypatch.setitem(dl.SOURCES, "mnist", dataclasses.replace(
        dl.SOURCES["mnist"], mirrors=((tmp_path / "gone").as_uri(),)))
    with pytest.raises(DownloadError, match=r"(?s)searched:.*download failed.*--data-dir"):
        load_dataset("mnist", progress=False)
    assert list((tmp_path / "xdg-cache" / "minires" / "mnist").iterdir()) == []


def test_search_order(tmp_path, monkeypatch):
    # four places with distinguishable tiny datasets (different seeds)
    places = {"data_dir": tmp_path / "explicit",
              "env": tmp_path / "env" / "fashion-mnist",
              "system": tmp_path / "system",
              "cache": tmp_path / "xdg-cache" / "minires" / "fashion-mnist"}
    expected = {key: tiny_mnist(folder, seed=i)["train"][1]
                for i, (key, folder) in enumerate(places.items())}
    monkeypatch.setitem(dl.SOURCES, "fashion-mnist", dataclasses.replace(
        dl.SOURCES["fashion-mnist"], system_dirs=(str(places["system"]),)))
    monkeypatch.setenv("MINIRES_DATA", str(tmp_path / "env"))

    def loaded(**kwargs):
        return load_dataset("fashion-mnist", download=False, verify=False, **kwargs)[1]

    numpy.testing.assert_array_equal(loaded(data_dir=places["data_dir"]), expected["data_dir"])
    numpy.testing.assert_array_equal(loaded(), expected["env"])
    monkeypatch.delenv("MINIRES_DATA")
    numpy.testing.assert_array_equal(loaded(), expected["system"])
    monkeypatch.setitem(dl.SOURCES, "fashion-mnist", dataclasses.replace(
        dl.SOURCES["fashion-mnist"], system_dirs=()))
    numpy.testing.assert_array_equal(loaded(), expected["cache"])


def test_raw_idx_files_are_found(tmp_path):
    arrays = tiny_mnist(tmp_path / "raw", gz=False)
    paths = locate("mnist", data_dir=tmp_path / "raw", download=False)
    assert paths["train-images-idx3-ubyte.gz"].name == "train-images-idx3-ubyte"
    y_train = load_dataset("mnist", data_dir=tmp_path / "raw", verify=False)[1]
    numpy.testing.assert_array_equal(y_train, arrays["train"][1])


def test_verify_rejects_other_data(tmp_path):
    tiny_mnist(tmp_path)  # same file names as MNIST, different content
    with pytest.raises(ChecksumError, match=r"images-idx3-ubyte\.gz: SHA-256 .*another"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_not_found_names_every_place(tmp_path, monkeypatch):
    system = tmp_path / "no-system"
    monkeypatch.setitem(dl.SOURCES, "fashion-mnist", dataclasses.replace(
        dl.SOURCES["fashion-mnist"], system_dirs=(str(system),)))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", download=False)
    message = str(info.value)
    for folder in search_dirs("fashion-mnist"):
        assert str(folder) in message
    assert str(system) in message and "xdg-cache" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def system_copy(tmp_path, monkeypatch):
    """A complete (tiny) system copy of Fashion-MNIST, which a named folder must never fall back to."""
    system = tmp_path / "system"
    tiny_mnist(system)
    monkeypatch.setitem(dl.SOURCES, "fashion-mnist", dataclasses.replace(
        dl.SOURCES["fashion-mnist"], system_dirs=(str(system),)))
    return system


def test_an_empty_data_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    system = system_copy(tmp_path, monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    for download in (False, True):  # nor a download into the cache
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("fashion-mnist", data_dir=empty, download=download, verify=False)
        message = str(info.value)
        assert f"named by --data-dir (data_dir=... in Python): {empty}" in message
        for name in IDX_NAMES:  # the files it looked for
            assert name in message
        assert f"{empty} (missing {', '.join(IDX_NAMES)})" in message
        assert str(system) not in message and "never falls back" in message
    assert not (tmp_path / "xdg-cache").exists()


def test_a_data_dir_lacking_one_file_names_it(tmp_path, monkeypatch):
    system_copy(tmp_path, monkeypatch)
    partial = tmp_path / "mine"
    tiny_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mine \(missing t10k-labels-idx1-ubyte\.gz\)"):
        load_dataset("fashion-mnist", data_dir=partial, verify=False)


def test_minires_data_lacking_the_files_is_an_error(tmp_path, monkeypatch):
    system_copy(tmp_path, monkeypatch)
    monkeypatch.setenv("MINIRES_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", verify=False)
    message = str(info.value)
    assert f"named by MINIRES_DATA: {tmp_path / 'env'}" in message
    assert f"{tmp_path / 'env' / 'fashion-mnist'} (no such folder)" in message
    assert "train-images-idx3-ubyte.gz or train-images-idx3-ubyte" in message


def test_files_read_are_returned_with_their_checksums(tmp_path):
    arrays = tiny_mnist(tmp_path / "mine")
    (x_train, y_train, _, _), files = load_dataset("mnist", data_dir=tmp_path / "mine", verify=False,
                                                  return_files=True)
    numpy.testing.assert_array_equal(y_train, arrays["train"][1])
    assert [f["role"] for f in files] == ["train images", "train labels", "test images", "test labels"]
    for f, name in zip(files, IDX_NAMES):
        assert f["path"] == str(tmp_path / "mine" / name) and f["verified"] is False
        content = gzip.decompress((tmp_path / "mine" / name).read_bytes())
        assert f["sha256"] == hashlib.sha256(content).hexdigest() and f["of"] == "decompressed content"
    banner = files_banner("mnist", files)
    assert banner.splitlines()[0] == ("data: mnist, NOT verified against the published checksums "
                                      "(verify=False or an extracted folder)")
    assert str(tmp_path / "mine" / "t10k-labels-idx1-ubyte.gz") in banner


def test_real_files_read_are_verified(fashion):  # (the fixture skips without the Debian package)
    _, files = load_dataset("fashion-mnist", data_dir=FASHION_DIR, return_files=True)
    sums = {f.name: f.payload_sha256 for f in dl.SOURCES["fashion-mnist"].files}
    assert [f["sha256"] for f in files] == [sums[n] for n in IDX_NAMES]
    assert all(f["verified"] for f in files)
    banner = files_banner("fashion-mnist", files).splitlines()
    assert banner[0] == ("data: fashion-mnist, SHA-256 of each file's decompressed content matches "
                         "the published value")
    assert len(banner) == 5 and str(FASHION_DIR / "train-images-idx3-ubyte.gz") in banner[1]


def test_unknown_dataset():
    with pytest.raises(ValueError, match="'imagenet'.*are cifar10, fashion-mnist, mnist"):
        load_dataset("imagenet")


def test_dataset_info():
    for name, info in DATASETS.items():
        assert info.name == name and len(info.mean) == len(info.std) == info.channels
        assert len(info.class_names) == info.num_classes == 10
    assert DATASETS["cifar10"].image_shape == (3, 32, 32)
    assert DATASETS["mnist"].hflip is False


# -- subset -----------------------------------------------------------------------

def test_subset_stratified():
    labels = numpy.repeat([0, 1, 2], [50, 30, 20])
    images = numpy.arange(100)
    x, y = subset(images, labels, 10, seed=1)
    numpy.testing.assert_array_equal(numpy.bincount(y), [5, 3, 2])
    numpy.testing.assert_array_equal(labels[x], y)          # images and labels stay paired
    assert len(set(x)) == 10 and numpy.all(numpy.diff(x) > 0)
    numpy.testing.assert_array_equal(subset(images, labels, 10, seed=1)[0], x)
    assert not numpy.array_equal(subset(images, labels, 10, seed=2)[0], x)
    x7, y7 = subset(images, labels, 7)                      # 3.5/2.1/1.4 -> 4/2/1
    numpy.testing.assert_array_equal(numpy.bincount(y7), [4, 2, 1])


def test_subset_random_and_bad_n():
    labels = numpy.zeros(20, dtype=numpy.int64)
    x, y = subset(numpy.arange(20), labels, 5, stratified=False)
    assert len(set(x)) == 5
    for n in (0, 21):
        with pytest.raises(ValueError, match=r"n must be in 1\.\.20"):
            subset(numpy.arange(20), labels, n)


# -- DataLoader -------------------------------------------------------------------

def make_images(n=10, c=3, h=6, w=5, seed=0):
    return numpy.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=numpy.uint8)


def epoch(loader):
    return [(backend.to_numpy(x), backend.to_numpy(y)) for x, y in loader]


def test_loader_shapes_dtypes_and_len():
    images, labels = make_images(10), numpy.arange(10)
    loader = DataLoader(images, labels, batch_size=4)
    batches = epoch(loader)
    assert len(loader) == len(batches) == 3
    assert [x.shape for x, _ in batches] == [(4, 3, 6, 5), (4, 3, 6, 5), (2, 3, 6, 5)]
    assert all(x.dtype == numpy.float32 and y.dtype == numpy.int64 for x, y in batches)
    numpy.testing.assert_array_equal(numpy.concatenate([y for _, y in batches]), labels)
    dropped = DataLoader(images, labels, batch_size=4, drop_last=True, shuffle=True, seed=0)
    batches = epoch(dropped)
    assert len(dropped) == len(batches) == 2 and dropped.num_samples == 8
    assert all(x.shape[0] == 4 for x, _ in batches)
    assert len(set(numpy.concatenate([y for _, y in batches]))) == 8


def test_loader_normalization():
    images = make_images(6)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = DataLoader(images, numpy.zeros(6, dtype=numpy.int64), batch_size=6, mean=mean, std=std)
    (x, _), = epoch(loader)
    mean_, std_ = numpy.reshape(mean, (1, 3, 1, 1)), numpy.reshape(std, (1, 3, 1, 1))
    expected = (images / 255.0 - mean_) / std_
    numpy.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    (x, _), = epoch(DataLoader(images, numpy.zeros(6, dtype=numpy.int64), batch_size=6))
    numpy.testing.assert_allclose(x, images / 255.0, rtol=1e-6)


def test_loader_deterministic_shuffle():
    images, labels = make_images(20), numpy.arange(20)

    def orders(seed, epochs=2):
        loader = DataLoader(images, labels, batch_size=7, shuffle=True, seed=seed)
        return [numpy.concatenate([y for _, y in epoch(loader)]) for _ in range(epochs)]

    first, second = orders(5)
    numpy.testing.assert_array_equal(numpy.sort(first), labels)     # a permutation
    assert not numpy.array_equal(first, second)                     # new order each epoch
    assert not numpy.array_equal(first, labels)
    for a, b in zip(orders(5), (first, second)):
        numpy.testing.assert_array_equal(a, b)                      # same seed, same orders
    assert not numpy.array_equal(orders(6, 1)[0], first)
    backend.manual_seed(11)                                         # seed=None: shared generator
    a = orders(None, 1)[0]
    backend.manual_seed(11)
    numpy.testing.assert_array_equal(orders(None, 1)[0], a)


def test_loader_state_resume_reproduces_next_epoch():
    images, labels = make_images(16), numpy.arange(16)
    kwargs = dict(batch_size=5, shuffle=True, augment=True, pad=2)
    loader = DataLoader(images, labels, seed=0, **kwargs)
    epoch(loader)
    state = json.loads(json.dumps(loader.get_state()))             # through a checkpoint
    expected = epoch(loader)
    resumed = DataLoader(images, labels, seed=123, **kwargs)
    resumed.set_state(state)
    for (x, y), (ex, ey) in zip(epoch(resumed), expected, strict=True):
        numpy.testing.assert_array_equal(y, ey)
        numpy.testing.assert_array_equal(x, ex)
    with pytest.raises(ValueError, match="set_state"):
        resumed.set_state({"bit_generator": "MT19937"})


def naive_pad_crop_flip(image, dy, dx, pad, flip):
    """Loop version of the augmentation for one (C, H, W) image (the test oracle)."""
    c, h, w = image.shape
    padded = numpy.zeros((c, h + 2 * pad, w + 2 * pad), dtype=image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


def test_pad_and_crop_and_flip_match_loops():
    images = make_images(7, c=2, h=5, w=6)
    rng = numpy.random.default_rng(0)
    offsets = rng.integers(0, 2 * 3 + 1, size=(7, 2))
    flips = rng.random(7) < 0.5
    out = hflip(pad_and_crop(images, offsets, 3), flips)
    assert out.shape == images.shape and out.dtype == numpy.uint8
    for i in range(7):
        numpy.testing.assert_array_equal(
            out[i], naive_pad_crop_flip(images[i], *offsets[i], 3, flips[i]))
    centered = pad_and_crop(images, numpy.full((7, 2), 3), 3)       # offset = pad: identity
    numpy.testing.assert_array_equal(centered, images)


def test_loader_augmentation():
    images, labels = make_images(32, c=1, h=8, w=8), numpy.arange(32)

    def run(seed, augment=True):
        return epoch(DataLoader(images, labels, batch_size=10, shuffle=False, seed=seed,
                                augment=augment))

    plain, aug, again = run(0, augment=False), run(0), run(0)
    assert [x.shape for x, _ in aug] == [x.shape for x, _ in plain]
    for (x, y), (x2, y2) in zip(aug, again, strict=True):
        numpy.testing.assert_array_equal(x, x2)                     # deterministic with the seed
    changed = numpy.concatenate([numpy.any(x != p, axis=(1, 2, 3))
                                 for (x, _), (p, _) in zip(aug, plain)])
    assert changed.mean() > 0.5                                     # most images moved or flipped
    assert not all(numpy.array_equal(x, x2) for (x, _), (x2, _) in zip(aug, run(1)))
    # without flips, each augmented image is a shifted copy: its pixels come from the original
    x, _ = epoch(DataLoader(images, labels, batch_size=32, seed=0, augment=True, flip=False))[0]
    for i in range(32):
        kept = set(numpy.round(x[i].ravel() * 255).astype(int)) - {0}
        assert kept <= set(images[i].ravel().tolist())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(images=numpy.zeros((4, 1, 2, 2), numpy.float32)), ValueError, "uint8"),
    (dict(images=numpy.zeros((4, 2, 2), numpy.uint8)), ValueError, r"\(N, C, H, W\)"),
    (dict(labels=numpy.zeros(3, numpy.int64)), ValueError, r"shape \(4,\)"),
    (dict(labels=[0, 1, 2, 3]), TypeError, "NumPy arrays"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(mean=(0.1, 0.2)), ValueError, r"one value per channel \(1\)"),
    (dict(std=0.0), ValueError, "std must be positive"),
])
def test_loader_bad_input(kwargs, error, message):
    args = dict(images=numpy.zeros((4, 1, 2, 2), numpy.uint8),
                labels=numpy.zeros(4, numpy.int64), batch_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        DataLoader(**args)


def test_loader_batches_on_cupy_backend():
    if not backend.cupy_available():
        pytest.skip("CuPy with a GPU is not available")
    import cupy
    images, labels = make_images(10), numpy.arange(10)
    cpu = epoch(DataLoader(images, labels, batch_size=4, shuffle=True, seed=0, augment=True,
                           mean=(0.5,) * 3, std=(0.25,) * 3))
    backend.set_backend("cupy")
    try:
        loader = DataLoader(images, labels, batch_size=4, shuffle=True, seed=0, augment=True,
                            mean=(0.5,) * 3, std=(0.25,) * 3)
        for (x, y), (cx, cy) in zip(loader, cpu, strict=True):
            assert isinstance(x, cupy.ndarray) and isinstance(y, cupy.ndarray)
            assert x.dtype == cupy.float32 and y.dtype == cupy.int64
            numpy.testing.assert_allclose(x.get(), cx, rtol=1e-6, atol=1e-6)
            numpy.testing.assert_array_equal(y.get(), cy)
    finally:
        backend.set_backend("numpy")
