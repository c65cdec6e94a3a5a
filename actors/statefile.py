"""`downloads.json` on disk: the lock, crash-safe writes with a backup, and loading with quarantine.

Blocking code: the persistence actor calls it from a worker thread, the recovery commands call
it directly. Everything that writes the state file, daemon or script, goes through `StateStore`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import filelock

from actors.atomic import fsync_directory, write_file_atomically, write_temporary
from actors.errors import CorruptState, StateError, StateLocked
from actors.layout import STATE_FILE_NAME, Layout
from actors.recovery import (
    Reconciled,
    merge_quarantine,
    quarantined_downloads,
    reconcile,
)
from actors.state import (
    CURRENT_VERSION,
    DecodedState,
    DownloadRecord,
    MigrationContext,
    decode_state,
    encode_entries,
    encode_entry,
)

log = logging.getLogger(__name__)

_TEMP_PREFIX = f".{STATE_FILE_NAME}."
_TEMP_SUFFIX = ".tmp"
# What os.link raises where a file system has no hard links (FAT and exFAT say EPERM).
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
)


def utc_stamp() -> str:
    """A UTC time for backup and quarantine names: `20261124T220000Z`."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


class LoadSource(StrEnum):
    """Where the loaded state came from."""

    FILE = "file"  # downloads.json
    BACKUP = "backup"  # downloads.json.bak, because downloads.json was missing or corrupt
    EMPTY = "empty"  # nothing loadable was left: started empty after quarantining what was there
    NEW = "new"  # no state file and no backup: a first start


@dataclass(frozen=True)
class LoadReport:
    """What loading found and did, for the log and for `stats`."""

    source: LoadSource
    migrated_from: int | None = None
    version_backup: Path | None = None
    quarantined: tuple[Path, ...] = ()
    problems: tuple[str, ...] = ()
    reconciled: tuple[str, ...] = ()  # what the backup was reconciled with the kept files


@dataclass
class StateStore:
    """The state file of one library: its lock, its loading and its writing."""

    directory: Path
    migration: MigrationContext
    _lock: filelock.FileLock = field(init=False)
    _encoded: dict[str, tuple[DownloadRecord, bytes]] = field(default_factory=dict, init=False)
    _hard_links: bool = field(default=True, init=False)  # until the file system says otherwise

    def __post_init__(self) -> None:
        self._lock = filelock.FileLock(self.lock_path, thread_local=False)

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE_NAME

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{STATE_FILE_NAME}.lock"

    @property
    def backup_path(self) -> Path:
        return self.directory / f"{STATE_FILE_NAME}.bak"

    @property
    def _backup_link_path(self) -> Path:
        return self.directory / f"{_TEMP_PREFIX}bak{_TEMP_SUFFIX}"

    # --- the lock -------------------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        return self._lock.is_locked

    def acquire_lock(self) -> None:
        """Takes the library's state lock, or raises `StateLocked` at once if another holds it
        (`StateError` when the state folder cannot be made or written)."""
        try:
            self.directory.mkdir(exist_ok=True)  # library_path itself: never (CONTRACT.md 3)
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise StateLocked(self.lock_path) from None
        except OSError as exc:
            raise StateError(f"cannot use the state folder {self.directory}: {exc}") from None

    def release_lock(self) -> None:
        self._lock.release()

    # --- loading --------------------------------------------------------------------------------

    def read(self) -> DecodedState | None:
        """Decodes `downloads.json` without the lock and without changing anything (for `show`).

        None when there is no state file. Raises `CorruptState` or `StateTooNew`.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return decode_state(raw, self.path, self.migration)

    def load(self) -> tuple[dict[str, DownloadRecord], LoadReport]:
        """Loads the state for the lock holder: quarantines a corrupt file, falls back to the
        backup, migrates an old version (keeping the old file), and leaves a valid current-version
        `downloads.json` behind whenever there is state to keep.

        Raises `StateTooNew` (touching nothing) for a file from a newer dlkeeper.
        """
        self._require_lock()
        self._remove_stale_temporaries()
        problems: list[str] = []
        quarantined: list[Path] = []
        for candidate, source in (
            (self.path, LoadSource.FILE),
            (self.backup_path, LoadSource.BACKUP),
        ):
            try:
                raw = candidate.read_bytes()
            except FileNotFoundError:
                continue
            try:
                decoded = decode_state(raw, candidate, self.migration)
            except CorruptState as exc:
                problems.append(f"{candidate.name}: {exc}")
                quarantined.append(self._quarantine(candidate))
                continue
            notes: tuple[str, ...] = ()
            if source is LoadSource.BACKUP:
                decoded, notes = self._reconcile_backup(decoded, candidate.stat().st_mtime_ns)
            kept = tuple(quarantined)
            return self._adopt(decoded, source, raw, kept, tuple(problems), reconciled=notes)
        source = LoadSource.EMPTY if quarantined else LoadSource.NEW
        report = LoadReport(source, quarantined=tuple(quarantined), problems=tuple(problems))
        _log_report(report, self.path, 0)
        return {}, report

    def _adopt(
        self,
        decoded: DecodedState,
        source: LoadSource,
        raw: bytes,
        quarantined: tuple[Path, ...],
        problems: tuple[str, ...],
        *,
        reconciled: tuple[str, ...] = (),
    ) -> tuple[dict[str, DownloadRecord], LoadReport]:
        version_backup: Path | None = None
        migrated = decoded.from_version != CURRENT_VERSION
        if migrated:
            version_backup = _unique(
                self.directory / f"{STATE_FILE_NAME}.v{decoded.from_version}-{utc_stamp()}"
            )
            write_file_atomically(version_backup, raw)
        if migrated or source is LoadSource.BACKUP:
            self.write(decoded.downloads)
        report = LoadReport(
            source,
            migrated_from=decoded.from_version if migrated else None,
            version_backup=version_backup,
            quarantined=quarantined,
            problems=problems,
            reconciled=reconciled,
        )
        _log_report(report, self.path, len(decoded.downloads))
        return decoded.downloads, report

    def _reconcile_backup(
        self, decoded: DecodedState, saved_ns: int
    ) -> tuple[DecodedState, tuple[str, ...]]:
        """The backup merged with the kept .torrent/.fastresume files (`actors.recovery.
        reconcile`): the backup is one write behind, and the files hold what came after it.
        A .torrent recreated from resume data is written back, and an entry left out goes to
        the quarantine file (kept in full when that file cannot take it)."""
        layout = Layout(self.directory.parent, self.migration.download_path)
        try:
            existing = self.quarantine_path.read_bytes()
        except FileNotFoundError:
            existing = None
        try:
            merged = reconcile(decoded.downloads, saved_ns, layout, quarantined_downloads(existing))
        except OSError as exc:  # torrents/ cannot be listed: the backup is all there is
            return decoded, (f"not reconciled: {layout.torrents_dir}: {exc.strerror or exc}",)
        downloads = dict(merged.downloads)
        notes = list(merged.notes)
        if merged.dropped:
            try:
                data = merge_quarantine(existing, merged.dropped, datetime.now(UTC))
                write_file_atomically(self.quarantine_path, data)
            except (CorruptState, OSError) as exc:
                notes.append(
                    f"{self.quarantine_path.name} cannot take the entries left out ({exc}); "
                    "they are kept in the state instead"
                )
                for task_id in merged.dropped:
                    downloads.setdefault(task_id, decoded.downloads[task_id])
            else:
                notes.append(f"the entries left out are kept in {self.quarantine_path.name}")
        try:
            keep_recreated_torrents(merged, layout)
        except OSError as exc:
            notes.append(f"a .torrent recreated from resume data cannot be written: {exc}")
        return DecodedState(downloads, decoded.from_version), tuple(notes)

    def _quarantine(self, path: Path) -> Path:
        """Renames a file that failed to load out of the way, its bytes untouched."""
        name = f"{STATE_FILE_NAME}.corrupt-{utc_stamp()}"
        if path == self.backup_path:
            name = f"{STATE_FILE_NAME}.bak.corrupt-{utc_stamp()}"
        target = _unique(self.directory / name)
        path.rename(target)
        fsync_directory(self.directory)
        log.error(
            "state: %s failed to load; kept as %s for manual recovery", path.name, target.name
        )
        return target

    def _remove_stale_temporaries(self) -> None:
        for leftover in self.directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    # --- writing --------------------------------------------------------------------------------

    def write(self, downloads: Mapping[str, DownloadRecord], *, keep_backup: bool = True) -> None:
        """Makes `downloads` the state on disk, durably, keeping the previous file as `.bak`.

        Crash safety, step by step:
        1. The new bytes go to a temporary file in the same folder, flushed and fsynced, so
           they are on disk before any name points at them.
        2. `.bak` becomes a hard link to the current `downloads.json`: link to a temporary name,
           then rename over `.bak`. A rename is atomic, so `.bak` always names either the old
           backup or the previous state, both complete files; a link copies no data and keeps
           the previous file's inode alive after step 3. Where the file system has no hard
           links (FAT, exFAT), `.bak` becomes a fsynced copy instead, renamed the same way.
        3. The temporary file is renamed over `downloads.json`: the name always points at a
           complete state, old or new, never at a partial one.
        4. The folder is fsynced, which makes the renames durable. Only then does a caller
           hear that its change is saved. A power cut before this step may undo either rename
           on its own (journals need not keep their order), which leaves each name on a
           complete file (the previous state or the new one), and nothing acknowledged is lost.

        `keep_backup=False` skips step 2: for the rewrite after a failed write, when
        `downloads.json` may hold the state that failed, which must not become the backup.

        Raises `OSError` when the disk refuses (ENOSPC, EIO). Which step failed is not said:
        the state on disk may then be the previous one or the new one (a failed folder fsync
        comes after the rename), so the caller writes what it holds again before it trusts
        the disk.
        """
        self._require_lock()
        data = encode_entries(self._encode_each(downloads))
        temporary = write_temporary(self.directory, data, prefix=_TEMP_PREFIX)
        try:
            if keep_backup:
                self._keep_backup()
            temporary.replace(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        fsync_directory(self.directory)

    def _encode_each(self, downloads: Mapping[str, DownloadRecord]) -> list[bytes]:
        # Records are immutable, so a record seen before need not be encoded again: a write of
        # 1,000 downloads after one change encodes one record and joins the rest.
        lines: list[bytes] = []
        cache: dict[str, tuple[DownloadRecord, bytes]] = {}
        for task_id, record in downloads.items():
            cached = self._encoded.get(task_id)
            line = cached[1] if cached is not None and cached[0] is record else None
            if line is None:
                line = encode_entry(task_id, record)
            lines.append(line)
            cache[task_id] = (record, line)
        self._encoded = cache
        return lines

    def _keep_backup(self) -> None:
        if self._hard_links:
            link = self._backup_link_path
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            try:
                os.link(self.path, link)
            except FileNotFoundError:
                return  # no previous state to keep
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                log.info("state: %s has no hard links; .bak is kept as a copy", self.directory)
                self._hard_links = False
            else:
                link.replace(self.backup_path)
                return
        self._copy_backup()

    def _copy_backup(self) -> None:
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            return  # no previous state to keep
        copy = write_temporary(self.directory, current, prefix=_TEMP_PREFIX)
        try:
            copy.replace(self.backup_path)
        except BaseException:
            with contextlib.suppress(OSError):
                copy.unlink()
            raise

    def _require_lock(self) -> None:
        if not self._lock.is_locked:
            raise StateError(f"the state lock {self.lock_path} is not held")

    # --- for the recovery commands --------------------------------------------------------------

    @property
    def quarantine_path(self) -> Path:
        """Where `dlkeeper-state repair` keeps the downloads it took out of the state."""
        return self.directory / f"{STATE_FILE_NAME}.quarantine"

    def set_aside(self, label: str) -> Path | None:
        """Renames `downloads.json`, its bytes untouched, to `downloads.json.{label}-<UTC time>`
        (a name not yet taken) before a recovery command replaces it; None when there is no
        state file. The lock must be held."""
        self._require_lock()
        target = _unique(self.directory / f"{STATE_FILE_NAME}.{label}-{utc_stamp()}")
        try:
            self.path.rename(target)
        except FileNotFoundError:
            return None
        fsync_directory(self.directory)
        return target


def keep_recreated_torrents(merged: Reconciled, layout: Layout) -> None:
    """Writes the .torrent files a reconciliation recreated from resume data, keeping a broken
    file that was in the way as `.corrupt-<time>`."""
    for task_id, torrent in merged.torrents.items():
        kept = layout.torrent_path(task_id)
        if kept.exists():
            kept.rename(_unique(kept.with_name(f"{kept.name}.corrupt-{utc_stamp()}")))
        write_file_atomically(kept, torrent)


def _unique(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`, ... so that a second quarantine in one second keeps both."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _log_report(report: LoadReport, path: Path, count: int) -> None:
    for problem in report.problems:
        log.error("state: %s", problem)
    for note in report.reconciled:
        log.warning("state: the backup reconciled with the kept files: %s", note)
    if report.source is LoadSource.BACKUP and not report.reconciled:
        log.info("state: the backup agrees with the kept .torrent/.fastresume files")
    if report.migrated_from is not None:
        log.warning(
            "state: migrated %s from version %d; the old file is kept as %s",
            path.name,
            report.migrated_from,
            report.version_backup,
        )
    messages = {
        LoadSource.FILE: "loaded %d downloads from %s",
        LoadSource.BACKUP: "loaded %d downloads from the backup of %s",
        LoadSource.EMPTY: "started EMPTY (%d downloads): neither %s nor its backup could be loaded",
        LoadSource.NEW: "no state yet (%d downloads): %s will be created",
    }
    level = (
        logging.WARNING if report.source in (LoadSource.BACKUP, LoadSource.EMPTY) else logging.INFO
    )
    log.log(level, "state: " + messages[report.source], count, path)
