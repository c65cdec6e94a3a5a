"""Careful file I/O: crash-safe writes (temporary file, fsync, rename, fsync of the folder),
and reads of small files that never block on a FIFO or a device."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from actors.errors import DlkeeperError

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


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; never blocks on a FIFO or device."""
    with open(path, "rb", opener=_open_nonblocking) as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise DlkeeperError(f"{path} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise DlkeeperError(f"{path} is larger than {limit} bytes")
    return data


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)
