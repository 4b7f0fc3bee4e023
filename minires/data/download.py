"""Find a dataset's files on disk, or download them with a checksum.

Search order for dataset ``NAME`` (the first folder holding *every* file wins):

1. ``data_dir`` (the ``--data-dir`` option): ``data_dir/NAME``, then ``data_dir``;
2. the environment variable ``MINIRES_DATA``: ``$MINIRES_DATA/NAME``, then itself;
3. the system folder, where a distribution package puts the data
   (``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``);
4. the user cache ``~/.cache/minires/NAME`` (``$XDG_CACHE_HOME/minires/NAME``);
5. download into the cache, from the dataset's canonical address and mirrors.

A folder the user named (1 or 2) is a promise: if it lacks the files, that is
an error naming the folder and the files looked for, never a quiet fall back
to another copy (which would train on data the user did not choose). Steps
3 to 5 are searched only when neither was given.

A download is streamed into a temporary file *in the destination folder* while
its SHA-256 is computed; only a file whose checksum matches is renamed into
place (``os.replace``, atomic on one filesystem). A failed or interrupted
download leaves no file, so a half-downloaded dataset never looks complete.

Checksums (SHA-256 of the files as published):

* MNIST and Fashion-MNIST ``.gz`` files and ``cifar-10-python.tar.gz``: the
  values are recorded by several independent projects (TensorFlow Datasets,
  Keras' ``cifar10.load_data``, torchvision-based scripts), found with a code
  search; they agree with each other and with the sizes and MD5 sums the
  dataset authors publish.
* ``payload_sha256`` is the SHA-256 of a gzipped file's *decompressed*
  content. Debian's ``dataset-fashion-mnist`` re-compresses the upstream files
  (its ``.gz`` files differ byte-wise from the published ones: MD5
  cf8536b0... instead of 8d4fb7e6... for ``train-images``), but their
  decompressed content has exactly the MD5 sums torchvision publishes for the
  raw Fashion-MNIST files (f4a8712d..., 9018921c..., 8181f547..., 15d48437...);
  the Fashion-MNIST payload SHA-256 values were computed from those verified
  files. The MNIST payload values come from the same code search (several
  projects agree). Checking the payload accepts any correct copy, however it
  was compressed.
"""
import contextlib
import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from .errors import ChecksumError, DownloadError


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset.

    name:           file name as published (and as stored in the cache).
    sha256:         SHA-256 of that file.
    payload_sha256: SHA-256 of the decompressed content (IDX files), or None.
    local_names:    other names under which a local copy is accepted
                    (the un-gzipped IDX file, the extracted CIFAR folder).
    """
    name: str
    sha256: str
    payload_sha256: str = None
    local_names: tuple = ()


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live: mirrors (base URLs tried in order), system
    folders, and a sentence telling a user how to get the data by hand."""
    files: tuple
    mirrors: tuple
    system_dirs: tuple = ()
    how_to_get: str = ""

    @property
    def names(self):
        """The published file names."""
        return tuple(f.name for f in self.files)


def _idx_file(name, sha256, payload_sha256):
    return RemoteFile(name, sha256, payload_sha256, local_names=(name.removesuffix(".gz"),))


SOURCES = {
    "fashion-mnist": Source(
        files=(
            _idx_file("train-images-idx3-ubyte.gz",
                      "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                      "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            _idx_file("train-labels-idx1-ubyte.gz",
                      "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                      "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            _idx_file("t10k-images-idx3-ubyte.gz",
                      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                      "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            _idx_file("t10k-labels-idx1-ubyte.gz",
                      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                      "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # the authors' address
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        how_to_get="on Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist`",
    ),
    "mnist": Source(
        files=(
            _idx_file("train-images-idx3-ubyte.gz",
                      "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                      "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            _idx_file("train-labels-idx1-ubyte.gz",
                      "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                      "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            _idx_file("t10k-images-idx3-ubyte.gz",
                      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                      "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            _idx_file("t10k-labels-idx1-ubyte.gz",
                      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                      "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        ),
        # The original site (yann.lecun.com) often refuses downloads now; the
        # mirrors serve byte-identical files (same SHA-256), so they go first.
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        how_to_get="download the four files from http://yann.lecun.com/exdb/mnist/",
    ),
    "cifar10": Source(
        files=(
            RemoteFile("cifar-10-python.tar.gz",
                       "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                       local_names=("cifar-10-batches-py",)),
        ),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        how_to_get="download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
}


def cache_dir(name):
    """The user cache folder of dataset ``name``: ``~/.cache/minires/NAME``
    (``$XDG_CACHE_HOME/minires/NAME`` when that variable is set)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "minires" / name


def named_dir(data_dir=None):
    """The folder the user named, as ``(folder, how it was named)``, or None:
    ``data_dir`` first, then ``$MINIRES_DATA``."""
    if data_dir:
        return Path(data_dir).expanduser(), "--data-dir (data_dir=... in Python)"
    if os.environ.get("MINIRES_DATA"):
        return Path(os.environ["MINIRES_DATA"]).expanduser(), "MINIRES_DATA"
    return None


def search_dirs(name, data_dir=None):
    """The folders searched for dataset ``name``, in order (without duplicates).

    A named folder (``data_dir``, else ``$MINIRES_DATA``) is searched alone:
    ``FOLDER/NAME`` then ``FOLDER``. Otherwise the system folders, then the cache.
    """
    named = named_dir(data_dir)
    if named:
        return list(dict.fromkeys([named[0] / name, named[0]]))
    dirs = [Path(d) for d in SOURCES[name].system_dirs]
    dirs.append(cache_dir(name))
    return list(dict.fromkeys(dirs))


def looked_for(remote):
    """The file names accepted for ``remote``, as one phrase."""
    return " or ".join((remote.name,) + remote.local_names)


def find_local(folder, remote):
    """The path of ``remote`` in ``folder`` (under its name or one of its
    ``local_names``), or None."""
    for candidate in (remote.name,) + remote.local_names:
        path = Path(folder) / candidate
        if path.exists():
            return path
    return None


def sha256_of(path, chunk_size=1 << 20):
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url, dest, sha256, progress):
    """Stream ``url`` into a temp file next to ``dest``; rename it only if its
    SHA-256 matches. On any failure the temp file is removed."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        from tqdm import tqdm  # only needed when downloading

        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "minires"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"download {dest.name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(f"{url}: SHA-256 of the download is {actual}, expected "
                                f"{sha256}; the downloaded file was deleted")
        os.replace(tmp, dest)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def download_file(urls, dest, sha256, progress=True):
    """Download the first of ``urls`` that works into ``dest`` and return ``dest``.

    Each URL is tried in turn until one gives a file whose SHA-256 is ``sha256``.
    If all fail: ChecksumError when every URL served wrong content, otherwise
    DownloadError; the message lists each URL's failure. ``dest`` is written
    only with verified content (see the module docstring).
    """
    if isinstance(urls, str):
        urls = [urls]
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        try:
            _fetch(url, dest, sha256, progress)
            return dest
        except ChecksumError as err:
            failures.append(err)
        except (OSError, HTTPException, ValueError) as err:  # URLError is an OSError
            failures.append(DownloadError(f"{url}: {type(err).__name__}: {err}"))
    lines = "\n  ".join(str(f) for f in failures)
    if all(isinstance(f, ChecksumError) for f in failures):
        raise ChecksumError(f"could not get {dest.name}:\n  {lines}") from failures[-1]
    raise DownloadError(f"could not download {dest.name}:\n  {lines}") from failures[-1]


def _describe(folder, source):
    """One line for the not-found message: what a searched folder lacks."""
    if not folder.is_dir():
        return f"{folder} (no such folder)"
    missing = [f.name for f in source.files if find_local(folder, f) is None]
    return f"{folder} (missing {', '.join(missing)})"


def locate(name, data_dir=None, download=True, progress=True):
    """Find (or download) every file of dataset ``name``.

    Returns ``{published file name: local path}``; a local path may be the
    un-gzipped IDX file or the extracted CIFAR folder. Raises FileNotFoundError
    naming every folder searched when the data is absent and ``download`` is
    False, DownloadError (or ChecksumError) when the download fails.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}: known datasets are {sorted(SOURCES)}")
    source = SOURCES[name]
    dirs = search_dirs(name, data_dir)
    for folder in dirs:
        paths = {f.name: find_local(folder, f) for f in source.files}
        if all(paths.values()):
            return paths
    named = named_dir(data_dir)
    if named:  # the user chose this folder: never another copy instead
        folder, how = named
        wanted = "\n  ".join(looked_for(f) for f in source.files)
        lacks = "\n  ".join(_describe(d, source) for d in dirs)
        raise FileNotFoundError(
            f"dataset {name!r} not found in the folder named by {how}: {folder}\n"
            f"looked in:\n  {lacks}\nfor the files:\n  {wanted}\n"
            f"Put the files there or name another folder (to get them: {source.how_to_get}). "
            "minires never falls back to another copy when a folder is named.")
    searched = "\n  ".join(_describe(d, source) for d in dirs)
    help_text = (f"To get it: {source.how_to_get}; or put {', '.join(source.names)} in a "
                 "folder and pass --data-dir FOLDER (data_dir=...) or set MINIRES_DATA")
    if not download:
        raise FileNotFoundError(f"dataset {name!r} not found; searched:\n  {searched}\n"
                                f"{help_text}, or allow the download.")
    cache = cache_dir(name)
    paths = {}
    for remote in source.files:
        paths[remote.name] = find_local(cache, remote)
        if paths[remote.name] is None:
            urls = [m.rstrip("/") + "/" + remote.name for m in source.mirrors]
            try:
                paths[remote.name] = download_file(urls, cache / remote.name,
                                                   remote.sha256, progress)
            except DownloadError as err:
                raise DownloadError(f"dataset {name!r} not found; searched:\n  {searched}\n"
                                    f"and the download failed: {err}\n{help_text}.") from err
    return paths
