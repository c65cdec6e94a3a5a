"""Where a library keeps its files on disk (CONTRACT.md section 3), and which of them a
download's replay reads. The one owner of both: the daemon, the recovery commands, the tests and
the benchmarks ask this module, never a path of their own making.

    {library_path}/data/downloads.json             the state (and .lock, .bak, .quarantine, ...)
    {download_path}/torrents/<task_id>.torrent     the kept copy of every download's .torrent
    {download_path}/torrents/<task_id>.fastresume  libtorrent's resume data
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actors.atomic import read_small_file
from actors.errors import DlkeeperError, StorageMissing
from actors.metainfo import MAX_TORRENT_BYTES, torrent_info_hash

if TYPE_CHECKING:
    from actors.state import DownloadRecord

STATE_FILE_NAME = "downloads.json"
MAX_RESUME_BYTES = 128 * 1024 * 1024  # resume data of a huge v2 torrent can be tens of MiB


@dataclass(frozen=True)
class Layout:
    """The paths of one library."""

    library_path: Path
    download_path: Path

    @property
    def state_dir(self) -> Path:
        return self.library_path / "data"

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE_NAME

    @property
    def torrents_dir(self) -> Path:
        return self.download_path / "torrents"

    def torrent_path(self, task_id: str) -> Path:
        """Where the .torrent copy of a download is kept (a magnet's, once its metadata came)."""
        return self.torrents_dir / f"{task_id}.torrent"

    def resume_path(self, task_id: str) -> Path:
        return self.torrents_dir / f"{task_id}.fastresume"

    def missing_storage(self) -> StorageMissing | None:
        """Which of library_path and download_path is not there: dlkeeper never creates them
        (CONTRACT.md section 3), so an unmounted drive is said, not papered over."""
        for key, path in (
            ("library_path", self.library_path),
            ("download_path", self.download_path),
        ):
            if not path.is_dir():
                what = "is not a folder" if path.exists() else "does not exist"
                return StorageMissing(
                    f"{key} {path} {what} (is its drive mounted?); dlkeeper never creates it"
                )
        return None

    def storage_devices(self) -> tuple[int, int]:
        """The file systems (st_dev) of library_path and download_path now: compared later by
        `storage_gone`, they tell a drive unmounted under a running daemon."""
        return (self.library_path.stat().st_dev, self.download_path.stat().st_dev)

    def storage_gone(self, devices: tuple[int, int]) -> StorageMissing | None:
        """Whether the storage the daemon started on is gone: a folder missing, the torrents
        folder missing, or a folder now on another file system than `devices` (what
        `storage_devices` said at start): the mount point of a drive unmounted, say."""
        missing = self.missing_storage()
        if missing is not None:
            return missing
        try:
            now = self.storage_devices()
            torrents_there = self.torrents_dir.is_dir()
        except OSError as exc:
            return StorageMissing(f"the library's folders cannot be read: {exc}")
        for key, path, before, after in zip(
            ("library_path", "download_path"),
            (self.library_path, self.download_path),
            devices,
            now,
            strict=True,
        ):
            if before != after:
                return StorageMissing(
                    f"{key} {path} is no longer on the file system it was on at start "
                    "(was its drive unmounted?)"
                )
        if not torrents_there:
            return StorageMissing(
                f"{self.torrents_dir} is gone (was the drive of download_path unmounted?)"
            )
        return None

    def leftover_temporaries(self) -> list[Path]:
        """The temporary files of .torrent and .fastresume writes a crash left behind
        (`.<task_id>.fastresume.<random>.tmp`, as `actors.atomic` names them)."""
        if not self.torrents_dir.is_dir():
            return []
        return [
            path
            for pattern in (".*.torrent.*.tmp", ".*.fastresume.*.tmp")
            for path in self.torrents_dir.glob(pattern)
            if path.is_file() and not path.is_symlink()
        ]


@dataclass(frozen=True)
class ReplayTorrent:
    """What a download's replay finds for its .torrent."""

    path: Path | None  # the file the replay reads; None: a magnet still without its metadata
    data: bytes | None  # its bytes, when they are a .torrent of this download
    problem: str | None  # why the file cannot be used, when it cannot

    @property
    def usable(self) -> bool:
        return self.data is not None


def replay_torrent(record: DownloadRecord, layout: Layout) -> ReplayTorrent:
    """The record's .torrent as the replay reads it: the record's `torrent_file_path`, else the
    copy kept for a magnet; it must decode and be of the record's info hash. A download whose
    .torrent is not usable is replayed from its magnet link when it has one."""
    kept = layout.torrent_path(record.task_id)
    path = Path(record.torrent_file_path) if record.torrent_file_path else kept
    if not record.torrent_file_path and not path.exists():
        return ReplayTorrent(None, None, None)
    try:
        data = read_small_file(path, MAX_TORRENT_BYTES)
        found = torrent_info_hash(data)
    except FileNotFoundError:
        return ReplayTorrent(path, None, f"its .torrent {path} is missing")
    except OSError as exc:
        return ReplayTorrent(path, None, f"its .torrent {path} cannot be read: {exc.strerror}")
    except DlkeeperError as exc:
        return ReplayTorrent(path, None, f"its .torrent {path} is invalid: {exc}")
    if record.info_hash and found != record.info_hash:
        return ReplayTorrent(
            path, None, f"its .torrent {path} is the torrent {found}, not {record.info_hash}"
        )
    return ReplayTorrent(path, data, None)
