"""Careful file I/O: crash-safe writes (temporary file, fsync, rename, fsync of the folder),
and reads of small files that never block on a FIFO or a device."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
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


def fsync_files(paths: Iterable[str], root: str | None = None) -> int:
    """Makes what the OS holds of every regular file in `paths` durable: each is fsynced, then
    each distinct folder holding one once, and the folders above those up to `root`, so that
    the names of new files and folders are durable too. A path that does not exist, or is a
    symlink or not a regular file, is skipped. Returns how many files were fsynced; raises the
    first `OSError` of an fsync that failed (the rest are not tried: the caller retries all).
    """
    folders: dict[Path, None] = {}  # ordered and distinct
    top = Path(os.path.normpath(root)) if root is not None else None
    synced = 0
    for name in paths:
        path = Path(os.path.normpath(name))
        try:
            # O_NONBLOCK: a FIFO put in a file's place must not hang us; O_NOFOLLOW: no syncing
            # of what a symlink points at, which is not the download's.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                continue
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            os.fsync(fd)
            synced += 1
        finally:
            os.close(fd)
        folder = path.parent
        while folder not in folders:
            folders[folder] = None
            if top is None or top not in folder.parents:  # `top` itself, or outside it
                break
            folder = folder.parent
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            fsync_directory(folder)
    return synced


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
