"""Checkpoints: one ``.npz`` file, safe to load, never half-written.

Layout of the archive (every entry a plain array, so ``allow_pickle=False``
loads it and no code in the file can ever run):

    model/<name>      the model's state dict (torchvision key names)
    optim/<key>       the optimizer's flat state dict
    __meta__          a JSON string: format version, the list of entries,
                      model config, epoch, schedule / RNG state, history, ...

Writes go to a temporary file in the same directory which is then renamed
over the target (``os.replace`` is atomic), so a crash mid-write leaves the
previous checkpoint intact. Zip members carry CRC-32 checksums, so a
corrupted file is detected when it is read; the zip directory has no
checksum, so the (checksummed) metadata lists every entry, and an entry lost
to a damaged directory is detected too.
"""
import json
import os
import tempfile

import numpy

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, or does not fit the model."""


def _umask():
    """The process's file-creation mask (reading it means setting it, then back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path, model_state, optim_state=None, meta=None):
    """Atomically write a checkpoint; ``meta`` must be JSON-serializable."""
    arrays = {f"model/{k}": numpy.asarray(v) for k, v in model_state.items()}
    for k, v in (optim_state or {}).items():
        arrays[f"optim/{k}"] = numpy.asarray(v)
    meta = {"format_version": FORMAT_VERSION, "entries": sorted(arrays), **(meta or {})}
    arrays["__meta__"] = numpy.array(json.dumps(meta))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Read a checkpoint; returns ``(model_state, optim_state, meta)``.

    Raises CheckpointError naming the file for anything that is not a complete
    minires checkpoint of a known format version.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        archive = numpy.load(path, allow_pickle=False)
        if isinstance(archive, numpy.lib.npyio.NpzFile):
            with archive:
                arrays = {k: archive[k] for k in archive.files}
                if len(arrays) != len(archive.files):  # a damaged name that duplicates another
                    raise ValueError(f"duplicate entries in {sorted(archive.files)}")
    # Damaged bytes surface as many exception types (zipfile.BadZipFile, a CRC
    # mismatch, zlib.error, EOFError, ValueError from an npy header, even
    # NotImplementedError or RuntimeError for a flipped flag or compression
    # field), and nothing else runs in this block: each one means a bad file.
    except Exception as err:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupted ({err})") from err
    if not isinstance(archive, numpy.lib.npyio.NpzFile):  # numpy.load read one .npy array
        raise CheckpointError(f"checkpoint {path!r} is a single .npy array, not a minires .npz checkpoint")
    if "__meta__" not in arrays:
        raise CheckpointError(f"checkpoint {path!r} has no __meta__ entry: not a minires checkpoint")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path!r} has unreadable metadata ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path!r} has metadata {meta!r}, expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version!r}; this minires reads version {FORMAT_VERSION}"
        )
    entries = meta.get("entries", sorted(arrays))  # (absent in files written before it existed)
    if sorted(arrays) != entries:
        lost, extra = sorted(set(entries) - set(arrays)), sorted(set(arrays) - set(entries))
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupted (entries missing: {lost}, "
                              f"unexpected: {extra})")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    return model_state, optim_state, meta


def saved_model_config(path, meta):
    """The model config a checkpoint's metadata records ({"name": ..., keyword arguments}); CheckpointError if none."""
    saved = meta.get("model")
    if not isinstance(saved, dict) or "name" not in saved:
        raise CheckpointError(f"checkpoint {path!r} does not say which model it holds")
    return saved


def check_model_config(path, meta, config):
    """Raise CheckpointError if the checkpoint was made for another architecture."""
    saved = saved_model_config(path, meta)
    if saved != config:
        raise CheckpointError(f"checkpoint {path!r} is for model {saved}, not {config}")
