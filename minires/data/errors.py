"""The errors the data package raises, so callers can catch them by kind.

* :class:`DataError` (a ``ValueError``): a file is there but its content is
  wrong -- truncated, corrupted, wrong format, wrong checksum.
* :class:`ChecksumError` (a ``DataError``): a SHA-256 did not match.
* :class:`DownloadError` (an ``OSError``): a download could not be completed
  (no network, HTTP error, every mirror failed).

A missing dataset raises the built-in ``FileNotFoundError``.
"""


class DataError(ValueError):
    """A data file exists but cannot be used; the message names the file."""


class ChecksumError(DataError):
    """A file's SHA-256 differs from the published one."""


class DownloadError(OSError):
    """Fetching a file from the network failed (the message lists every try)."""
