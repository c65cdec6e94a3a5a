"""Crash-safe file writes: temporary file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".dlkeeper."
TEMP_SUFFIX = ".tmp"


def write_temporary(directory: Path, data: bytes, prefix: str = TEMP_PREFIX) -> Path:
    """A new fsynced file in `directory` holding `data`, named `{prefix}<random>.tmp`."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=directory)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            Path(name).unlink()
        raise
    os.close(fd)
    return Path(name)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_file_atomically(path: Path, data: bytes) -> None:
    """Makes `path` hold `data`, crash-safely: a temporary file in the same folder, fsynced,
    renamed over `path`, then the folder fsynced. Readers see the old file or the new one."""
    temporary = write_temporary(path.parent, data, prefix=f".{path.name}.")
    temporary.replace(path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
