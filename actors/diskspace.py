"""Downloads waiting for disk space, by file system: which to hold, which may go on, and what
to say about it. The decisions only; the session actor measures (statvfs, off the event loop)
and tells the worker (`WaitForSpace`, `SpaceBack`).

A file system waits when libtorrent ran out of space on it (ENOSPC, EDQUOT): then every
download writing to it waits, and goes on once it has more than `min_free_bytes` free and at
least `RESUME_FREE_BYTES`. A magnet whose metadata shows that its wanted bytes do not fit in the
free space less `min_free_bytes` waits alone, until they do. Nothing of this is persisted: a
restarted daemon meets the full disk again and waits again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from actors.messages.worker import TorrentStatus

POLL_INTERVAL = 2.0  # seconds between looks at the free space while anything waits
# "Not trivially small": with min_free_bytes 0, a few bytes freed must not restart downloads
# that fill them at once.
RESUME_FREE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Place:
    """A file system (its device number) and the folder named for it in sentences."""

    device: int
    path: str


def place_of(save_path: str, download_path: Path) -> Place:
    """Where `save_path` writes: download_path names it when on the same file system.
    Blocks (stat): call it off the event loop. Raises `OSError`."""
    device = existing_folder(save_path).stat().st_dev
    try:
        if download_path.stat().st_dev == device:
            return Place(device, str(download_path))
    except OSError:
        pass
    return Place(device, save_path)


def devices_of(save_paths: Iterable[str]) -> dict[str, int | None]:
    """The device of each save path (None when it cannot be told). Blocks."""
    devices: dict[str, int | None] = {}
    for path in set(save_paths):
        try:
            devices[path] = existing_folder(path).stat().st_dev
        except OSError:
            devices[path] = None
    return devices


def free_bytes(path: str) -> int | None:
    """Free space for an unprivileged writer on the file system of `path`, None when it
    cannot be told. Blocks."""
    try:
        stats = os.statvfs(existing_folder(path))
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def existing_folder(path: str) -> Path:
    """`path`, or its nearest ancestor that exists (libtorrent makes a save path on write)."""
    folder = Path(path)
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def size_text(size: int) -> str:
    """`12.0 MiB`, `1.0 GiB`, `512 B`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class _Waiting:
    """One file system downloads wait on."""

    path: str
    full: bool = False  # libtorrent ran out of space there: every download on it waits
    needs: dict[str, int] = field(default_factory=dict)  # task_id -> its wanted bytes left


@dataclass(frozen=True)
class SpacePlan:
    """What to tell the worker after a look at the free space, and the problems as they are
    now (key -> sentence, None: over)."""

    holds: dict[str, tuple[str, ...]]  # reason -> the downloads to hold with it
    releases: tuple[str, ...]
    problems: dict[str, str | None]


class SpaceWaits:
    """The file systems downloads wait on; see the module docstring."""

    def __init__(self, min_free_bytes: int) -> None:
        self._min_free = min_free_bytes
        self._waiting: dict[int, _Waiting] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def paths(self) -> dict[int, str]:
        """The folder to measure, by device, for every file system something waits on."""
        return {device: waiting.path for device, waiting in self._waiting.items()}

    def is_full(self, device: int) -> bool:
        waiting = self._waiting.get(device)
        return waiting is not None and waiting.full

    def ran_out(self, place: Place) -> None:
        """libtorrent ran out of space at `place`: every download there waits."""
        self._waiting.setdefault(place.device, _Waiting(place.path)).full = True

    def fits(self, free: int | None, wanted: int) -> bool:
        """Whether `wanted` more bytes fit in `free` less min_free_bytes (unknown: yes)."""
        return free is None or wanted <= free - self._min_free

    def does_not_fit(self, place: Place, task_id: str, wanted: int) -> None:
        """A download at `place` wants `wanted` more bytes than fit: it waits until they do."""
        self._waiting.setdefault(place.device, _Waiting(place.path)).needs[task_id] = wanted

    def full_reason(self, device: int, free: int | None) -> str:
        return (
            f"waiting for disk space: {self._waiting[device].path} has {_free_text(free)} free, "
            f"{size_text(self._min_free)} must stay free (min_free_bytes)"
        )

    def need_reason(self, device: int, free: int | None, wanted: int) -> str:
        return (
            f"waiting for disk space: {self._waiting[device].path} has {_free_text(free)} free, "
            f"the download needs {size_text(wanted)} more and {size_text(self._min_free)} must "
            "stay free (min_free_bytes)"
        )

    def plan(
        self,
        torrents: Iterable[TorrentStatus],
        devices: dict[str, int | None],
        free: dict[int, int | None],
    ) -> SpacePlan:
        """Decides from the downloads in the session (with the device of each save path) and
        the free space of each file system waited on (None: unknown, so it still waits).
        A download the worker holds on a file system not waited on yet (it ran out before its
        `TorrentOutOfSpace` was handled) makes that one full."""
        torrents = list(torrents)
        present = {torrent.task_id for torrent in torrents}
        for torrent in torrents:
            device = devices.get(torrent.save_path)
            if torrent.waiting_for_space is not None and device is not None:
                self._waiting.setdefault(device, _Waiting(torrent.save_path, full=True))
        holds: dict[str, list[str]] = {}
        releases: list[str] = []
        problems: dict[str, str | None] = {}
        for device, waiting in list(self._waiting.items()):
            space = free.get(device)
            if space is not None:
                if waiting.full and space > self._min_free and space >= RESUME_FREE_BYTES:
                    waiting.full = False
                for task_id, wanted in list(waiting.needs.items()):
                    if self.fits(space, wanted):
                        del waiting.needs[task_id]
            for task_id in [task_id for task_id in waiting.needs if task_id not in present]:
                del waiting.needs[task_id]  # removed meanwhile
            held = 0
            for torrent in torrents:
                if devices.get(torrent.save_path) != device:
                    continue
                if torrent.task_id in waiting.needs:
                    reason = self.need_reason(device, space, waiting.needs[torrent.task_id])
                elif waiting.full and _writes(torrent):
                    reason = self.full_reason(device, space)
                else:
                    if torrent.waiting_for_space is not None:
                        releases.append(torrent.task_id)
                    continue
                holds.setdefault(reason, []).append(torrent.task_id)
                held += 1
            key = f"disk-space:{device}"
            if not waiting.full and not waiting.needs:
                del self._waiting[device]
                problems[key] = None
            else:
                downloads = f"{held} download{'' if held == 1 else 's'}"
                problems[key] = (
                    f"{downloads} waiting for disk space on {waiting.path}: "
                    f"{_free_text(space)} free, {size_text(self._min_free)} must stay free "
                    "(min_free_bytes)"
                )
        return SpacePlan(
            holds={reason: tuple(ids) for reason, ids in holds.items()},
            releases=tuple(releases),
            problems=problems,
        )


def _writes(torrent: TorrentStatus) -> bool:
    """A download that writes, or would once libtorrent's queue starts it: not a paused one
    (out of the queue), not a finished one."""
    if torrent.finished:
        return False
    return torrent.waiting_for_space is not None or torrent.auto_managed


def _free_text(free: int | None) -> str:
    return "an unknown amount of space" if free is None else size_text(free)
