"""What the recovery commands know about a library, as pure functions over records and files.

`dlkeeper-state` is a thin layer over this module: `check_records` finds every problem the
daemon would meet when it loads and replays the state, `salvage` reads what can be kept of a
damaged state file, `needs_quarantine` tells which downloads cannot be resumed at all,
`rebuild_records` recreates records from the `.torrent` and `.fastresume` files, `reconcile`
merges those with what a backup holds (for `rebuild` and for the daemon's own fallback to the
backup), and `merge_quarantine` keeps quarantined records. Nothing here takes the lock or
writes a file; the only files read are the state's `.torrent` and `.fastresume` companions,
the save paths and their mtimes. libtorrent is not imported: resume data is bencode, read by
`actors.metainfo.bdecode`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import ValidationError

from actors.atomic import read_small_file
from actors.errors import CorruptState, DlkeeperError
from actors.layout import MAX_RESUME_BYTES, Layout, replay_torrent
from actors.metainfo import (
    MAX_TORRENT_BYTES,
    TorrentSummary,
    bdecode,
    bencode,
    magnet_info_hash,
    read_torrent,
)
from actors.state import (
    ACTIVE_STATUSES,
    CURRENT_VERSION,
    FINISHED_STATUSES,
    TASK_ID_PATTERN,
    DownloadRecord,
    DownloadStatus,
    MigrationContext,
    decode_state,
)

DEFAULT_PRIORITY = 4
_TASK_ID = re.compile(TASK_ID_PATTERN)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the state. `task_id` is None for the file as a whole;
    `resumable` is False when the daemon cannot put the download back into libtorrent."""

    task_id: str | None
    message: str
    resumable: bool = True

    def __str__(self) -> str:
        return self.message if self.task_id is None else f"{self.task_id}: {self.message}"


# --- the .torrent, the magnet and the resume data of a record -----------------------------------


def read_resume(path: Path) -> dict[bytes, Any] | None:
    """A .fastresume file decoded, or None when it is missing. Raises `DlkeeperError` for a
    file that is not bencoded resume data, `OSError` for one that cannot be read."""
    try:
        data = read_small_file(path, MAX_RESUME_BYTES)
    except FileNotFoundError:
        return None
    decoded = bdecode(data)
    if not isinstance(decoded, dict):
        raise DlkeeperError(f"{path} is not resume data (not a bencoded dictionary)")
    return decoded


def resume_info_hash(resume: Mapping[bytes, Any]) -> str | None:
    """The info hash resume data is for, as dlkeeper writes it: v1 unless the torrent is v2-only."""
    for key in (b"info-hash", b"info-hash2"):
        value = resume.get(key)
        if isinstance(value, bytes) and value.strip(b"\0"):
            return value.hex()
    return None


def torrent_from_resume(resume: Mapping[bytes, Any], info_hash: str | None) -> bytes | None:
    """A .torrent made of the info dictionary kept in resume data (the daemon saves it there),
    or None when there is none or it is not the torrent `info_hash` (when given)."""
    info = resume.get(b"info")
    if not isinstance(info, dict):
        return None
    torrent = bencode({b"info": info})
    try:
        found = read_torrent(torrent).info_hash
    except DlkeeperError:
        return None
    expected = info_hash or resume_info_hash(resume)
    return torrent if expected is None or found == expected else None


# --- checking -----------------------------------------------------------------------------------


def check_records(downloads: Mapping[str, DownloadRecord], paths: Layout) -> list[Problem]:
    """Every problem the daemon would meet replaying `downloads`, in the order of the file."""
    problems: list[Problem] = []
    owners: dict[str, str] = {}
    for task_id, record in downloads.items():
        problems.extend(check_record(record, paths))
        if record.info_hash and record.status in ACTIVE_STATUSES:
            first = owners.setdefault(record.info_hash, task_id)
            if first != task_id:
                problems.append(
                    Problem(task_id, f"it is the same torrent as {first}; only one can be resumed")
                )
    return problems


def check_record(record: DownloadRecord, paths: Layout) -> list[Problem]:
    """The problems of one download: its source (the .torrent, else the magnet), its resume
    data and its save path. A failed download is never resumed, so only its schema matters."""
    if record.status is DownloadStatus.FAILED:
        return []
    task_id = record.task_id
    active = record.status in ACTIVE_STATUSES
    problems: list[Problem] = []
    torrent = replay_torrent(record, paths)
    magnet_problem = _magnet_problem(record)
    if magnet_problem is not None:
        problems.append(Problem(task_id, magnet_problem, resumable=torrent.usable or not active))
    if torrent.problem is not None:
        if not active:
            consequence = "its files cannot be listed"
        elif record.magnet_link and magnet_problem is None:
            consequence = "the magnet link is used instead (metadata is fetched from peers again)"
        else:
            consequence = "with no usable magnet link either, it cannot be resumed"
        resumable = not active or (bool(record.magnet_link) and magnet_problem is None)
        problems.append(Problem(task_id, f"{torrent.problem}; {consequence}", resumable))
    if active:
        problems.extend(_resume_problems(record, paths))
    problems.extend(_save_path_problems(record, paths))
    return problems


def is_resumable(record: DownloadRecord, paths: Layout) -> bool:
    """Whether the daemon can put the download back into libtorrent (finished ones always
    count as resumable: they wait for the bot's ack, not for libtorrent)."""
    return all(problem.resumable for problem in check_record(record, paths))


def _magnet_problem(record: DownloadRecord) -> str | None:
    if record.magnet_link is None:
        return None
    try:
        found = magnet_info_hash(record.magnet_link)
    except DlkeeperError as exc:
        return f"its magnet link does not parse: {exc}"
    if record.info_hash and found != record.info_hash:
        return f"its magnet link names the torrent {found}, not {record.info_hash}"
    return None


def _resume_problems(record: DownloadRecord, paths: Layout) -> list[Problem]:
    path = paths.resume_path(record.task_id)
    try:
        resume = read_resume(path)
    except OSError as exc:
        reason = f"cannot be read: {exc.strerror}"
    except DlkeeperError as exc:
        reason = f"is invalid: {exc}"
    else:
        found = resume_info_hash(resume) if resume is not None else None
        if found is None or record.info_hash is None or found == record.info_hash:
            return []
        reason = f"is for the torrent {found}, not {record.info_hash}"
    return [
        Problem(
            record.task_id,
            f"its resume data {path} {reason}; libtorrent ignores it and re-checks the files",
        )
    ]


def _save_path_problems(record: DownloadRecord, paths: Layout) -> list[Problem]:
    save_path = Path(record.save_path)
    if not save_path.is_absolute():
        return [Problem(record.task_id, f"its save path {save_path} is not an absolute path")]
    problems: list[Problem] = []
    root = paths.download_path.resolve()
    resolved = save_path.resolve()
    if resolved != root and root not in resolved.parents:
        problems.append(
            Problem(record.task_id, f"its save path {save_path} is outside download_path {root}")
        )
    if not save_path.is_dir():
        # A download that has not started may not have its folder yet; one with data must.
        if record.status is DownloadStatus.COMPLETED:
            problems.append(
                Problem(record.task_id, f"its save path {save_path} is missing: no files to import")
            )
        elif record.progress > 0:
            problems.append(
                Problem(
                    record.task_id,
                    f"its save path {save_path} is missing: its {record.progress:.0%} "
                    "downloaded is gone and it starts over",
                )
            )
    return problems


# --- salvaging a damaged state file -------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """An entry of the state file that is not a valid download, kept as it was."""

    entry: object
    reason: str


@dataclass(frozen=True)
class Salvaged:
    """What can be kept of a state file. `problem` says why the file as a whole does not load
    (None when it loads); `rejected` holds the entries that made it fail."""

    downloads: dict[str, DownloadRecord]
    from_version: int
    problem: str | None = None
    rejected: dict[str, Rejected] = field(default_factory=dict)


def salvage(raw: bytes, path: Path, context: MigrationContext) -> Salvaged:
    """Decodes a state file, and when it does not load, keeps every valid download of it.

    Only a current-version file with its `downloads` object intact can be salvaged entry by
    entry; anything else raises `CorruptState` (and a file of a newer dlkeeper `StateTooNew`).
    """
    try:
        decoded = decode_state(raw, path, context)
    except CorruptState as exc:
        problem = str(exc)
    else:
        return Salvaged(decoded.downloads, decoded.from_version)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise CorruptState(problem) from None
    entries = data.get("downloads") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("version") != CURRENT_VERSION:
        raise CorruptState(problem)
    if not isinstance(entries, dict):
        raise CorruptState(problem)
    downloads: dict[str, DownloadRecord] = {}
    rejected: dict[str, Rejected] = {}
    for key, entry in entries.items():
        try:
            record = DownloadRecord.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            rejected[key] = Rejected(entry, f"invalid entry at {where or key}: {first['msg']}")
            continue
        if record.task_id != key:
            rejected[key] = Rejected(entry, f"entry {key!r} holds task_id {record.task_id!r}")
            continue
        downloads[key] = record
    return Salvaged(downloads, CURRENT_VERSION, problem, rejected)


# --- the quarantine file ------------------------------------------------------------------------


def merge_quarantine(
    existing: bytes | None, entries: Mapping[str, Rejected], when: datetime
) -> bytes:
    """The quarantine file with `entries` added to what it held:
    `{"version": 1, "downloads": {key: entry as it was}, "reasons": {key: {"reason", "at"}}}`.

    A key already there gets a `~2`, `~3`, ... suffix, so nothing quarantined before is lost.
    Raises `CorruptState` when `existing` is not such a file (it is then not touched).
    """
    downloads: dict[str, object] = {}
    reasons: dict[str, object] = {}
    if existing is not None:
        try:
            data = orjson.loads(existing)
        except orjson.JSONDecodeError as exc:
            raise CorruptState(f"not JSON: {exc}") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("downloads"), dict)
            or not isinstance(data.get("reasons", {}), dict)
        ):
            raise CorruptState("not a quarantine file (no downloads object)")
        downloads.update(data["downloads"])
        reasons.update(data.get("reasons", {}))
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for task_id, rejected in entries.items():
        key, n = task_id, 1
        while key in downloads:
            n += 1
            key = f"{task_id}~{n}"
        downloads[key] = rejected.entry
        reasons[key] = {"reason": rejected.reason, "at": stamp}
    payload = {"version": CURRENT_VERSION, "downloads": downloads, "reasons": reasons}
    return orjson.dumps(payload, option=orjson.OPT_INDENT_2) + b"\n"


def record_json(record: DownloadRecord) -> object:
    """A record as it stands in the state file, for the quarantine file."""
    return orjson.loads(record.to_json())


# --- rebuilding from .torrent and .fastresume files ---------------------------------------------


@dataclass(frozen=True)
class RebuiltDownload:
    """A record recreated from a download's files; `torrent` is a .torrent to write (made from
    the resume data's info dictionary) when the kept one was lost or is invalid."""

    record: DownloadRecord
    torrent: bytes | None = None
    notes: tuple[str, ...] = ()
    # When its .fastresume was written (st_mtime_ns), if it held resume data of this torrent.
    resume_saved_ns: int | None = None
    progress_known: bool = False  # the resume data's pieces could be read


@dataclass(frozen=True)
class Rebuilt:
    downloads: dict[str, RebuiltDownload]
    skipped: dict[str, str]  # task_id -> why no record could be made


def rebuild_records(paths: Layout) -> Rebuilt:
    """Recreates a record for every `<task_id>.torrent` / `<task_id>.fastresume` in
    `{download_path}/torrents/`: name, info hash, save path, file priorities, pause state and
    progress from the resume data where it holds them, else from the .torrent and defaults.

    What only the state file held (peers, torrent_metadata, validation_metadata, a magnet's
    trackers beyond the resume data's) cannot be recovered.
    """
    task_ids: set[str] = set()
    if paths.torrents_dir.is_dir():
        for child in paths.torrents_dir.iterdir():
            if child.suffix in (".torrent", ".fastresume") and _TASK_ID.match(child.stem):
                task_ids.add(child.stem)
    downloads: dict[str, RebuiltDownload] = {}
    skipped: dict[str, str] = {}
    for task_id in sorted(task_ids):
        try:
            downloads[task_id] = _rebuild_one(task_id, paths)
        except _Unrecoverable as exc:
            skipped[task_id] = str(exc)
        except (OSError, ValueError, OverflowError) as exc:  # pydantic's too: a bad value
            # One damaged file costs its own download, never the rebuild of the others.
            skipped[task_id] = f"its files hold something unusable: {_reason(exc)}"
    ordered = dict(sorted(downloads.items(), key=lambda item: item[1].record.created_at))
    return Rebuilt(ordered, skipped)


class _Unrecoverable(Exception):
    pass


@dataclass(frozen=True)
class _Sources:
    torrent: bytes | None  # a usable .torrent: the kept one, else one recreated from the resume
    summary: TorrentSummary | None
    resume: dict[bytes, Any] | None  # of this torrent, when there is a .torrent to tell
    recreated: bool


def _read_sources(task_id: str, paths: Layout, notes: list[str]) -> _Sources:
    torrent_path = paths.torrent_path(task_id)
    resume_path = paths.resume_path(task_id)
    torrent: bytes | None = None
    summary: TorrentSummary | None = None
    try:
        torrent = read_small_file(torrent_path, MAX_TORRENT_BYTES)
        summary = read_torrent(torrent)
    except FileNotFoundError:
        torrent = None
    except (OSError, DlkeeperError) as exc:
        torrent = None
        notes.append(f"{torrent_path.name} is unusable ({_reason(exc)})")
    resume: dict[bytes, Any] | None = None
    try:
        resume = read_resume(resume_path)
    except (OSError, DlkeeperError) as exc:
        notes.append(f"{resume_path.name} is unusable ({_reason(exc)})")
    if resume is not None and summary is not None:
        found = resume_info_hash(resume)
        if found is not None and found != summary.info_hash:
            notes.append(f"{resume_path.name} is of another torrent ({found}); ignored")
            resume = None
    if summary is None and resume is not None:
        torrent = torrent_from_resume(resume, None)
        if torrent is not None:
            notes.append(f"{torrent_path.name} recreated from the resume data")
            return _Sources(torrent, read_torrent(torrent), resume, recreated=True)
    return _Sources(torrent, summary, resume, recreated=False)


def _rebuild_one(task_id: str, paths: Layout) -> RebuiltDownload:
    notes: list[str] = []
    torrent_path = paths.torrent_path(task_id)
    resume_path = paths.resume_path(task_id)
    sources = _read_sources(task_id, paths, notes)
    summary, resume = sources.summary, sources.resume
    resume_saved_ns = _mtime_ns(resume_path) if resume is not None else None
    info_hash = summary.info_hash if summary is not None else None
    if info_hash is None and resume is not None:
        info_hash = resume_info_hash(resume)
    if info_hash is None:
        raise _Unrecoverable("neither a usable .torrent nor resume data naming its torrent")
    resume = resume or {}
    info = _info_dict(sources.torrent)
    name = summary.name if summary is not None else _text(resume.get(b"name")) or task_id
    layout = _file_layout(info) if info is not None else None
    priorities = _user_priorities(resume.get(b"file_priority"), layout)
    if isinstance(resume.get(b"file_priority"), list) and priorities is None:
        notes.append("file priorities not recovered (they do not match the torrent's files)")
    have = _pieces(resume.get(b"pieces"), layout, info)
    progress, finished = _progress(have, layout, info, priorities)
    status = _status(resume, progress, finished)
    created = _time(resume.get(b"added_time")) or _mtime(torrent_path, resume_path)
    completed_at = None
    if status is DownloadStatus.COMPLETED:
        completed_at = _time(resume.get(b"completed_time")) or _mtime(resume_path, torrent_path)
    save_path = _text(resume.get(b"save_path")) or str(paths.download_path)
    has_torrent = summary is not None
    record = DownloadRecord(
        task_id=task_id,
        name=name,
        info_hash=info_hash,
        created_at=created,
        status=status,
        magnet_link=None if has_torrent else _magnet(info_hash, name, resume),
        torrent_file_path=str(torrent_path) if has_torrent else None,
        save_path=save_path,
        file_priorities=priorities or (),
        progress=progress,
        completed_at=completed_at,
    )
    return RebuiltDownload(
        record,
        sources.torrent if sources.recreated else None,
        tuple(notes),
        resume_saved_ns=resume_saved_ns,
        progress_known=have is not None,
    )


def _reason(exc: BaseException) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


def _text(value: object) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) and value else None


def _time(value: object) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, ValueError, OSError):  # a time no calendar holds
            return None
    return None


def _mtime(*candidates: Path) -> datetime:
    for path in candidates:
        try:
            return datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            continue
    return datetime.now(UTC)


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _info_dict(torrent: bytes | None) -> dict[bytes, Any] | None:
    if torrent is None:
        return None
    root = bdecode(torrent)
    info = root.get(b"info") if isinstance(root, dict) else None
    return info if isinstance(info, dict) else None


def _file_layout(info: Mapping[bytes, Any]) -> list[tuple[int, bool]] | None:
    """The files as libtorrent lays them out: (size, is padding), padding files included.

    v1 and hybrid torrents list their padding files; for v2-only ones libtorrent pads every
    file that does not end on a piece boundary.
    """
    listed = info.get(b"files")
    if isinstance(listed, list):
        return [
            (_int(entry.get(b"length")), b"p" in _bytes(entry.get(b"attr")))
            for entry in listed
            if isinstance(entry, dict)
        ]
    if isinstance(info.get(b"length"), int):
        return [(info[b"length"], False)]
    tree = info.get(b"file tree")
    piece_length = _int(info.get(b"piece length"))
    if not isinstance(tree, dict) or piece_length <= 0:
        return None
    layout: list[tuple[int, bool]] = []
    for size in _tree_sizes(tree):
        layout.append((size, False))
        if size % piece_length:
            layout.append((piece_length - size % piece_length, True))
    return layout


def _tree_sizes(node: Mapping[bytes, Any]) -> Iterable[int]:
    for key in sorted(node):
        child = node[key]
        if key == b"" and isinstance(child, dict):
            yield _int(child.get(b"length"))
        elif isinstance(child, dict):
            yield from _tree_sizes(child)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else b""


def _user_priorities(
    value: object, layout: list[tuple[int, bool]] | None
) -> tuple[int, ...] | None:
    """libtorrent's priorities (one per file, padding included, possibly fewer than files) as
    the user's (one per real file); None when they cannot be mapped."""
    if not isinstance(value, list) or not all(_valid_priority(p) for p in value):
        return None
    if layout is None:
        return None
    if len(value) > len(layout):
        return None
    full = [*value, *[DEFAULT_PRIORITY] * (len(layout) - len(value))]
    return tuple(p for p, (_, pad) in zip(full, layout, strict=True) if not pad)


def _valid_priority(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7


def _pieces(
    value: object, layout: list[tuple[int, bool]] | None, info: Mapping[bytes, Any] | None
) -> list[bool] | None:
    """The pieces libtorrent had, from resume data's `pieces`: one byte per piece (bit 0 =
    have) in older files, a bitfield (most significant bit first) in libtorrent 2.1's."""
    if not isinstance(value, bytes) or layout is None or info is None:
        return None
    piece_length = _int(info.get(b"piece length"))
    if piece_length <= 0:
        return None
    count = math.ceil(sum(size for size, _ in layout) / piece_length)
    if len(value) == count:
        return [bool(byte & 1) for byte in value]
    if len(value) == math.ceil(count / 8):
        return [bool(value[i // 8] & (0x80 >> (i % 8))) for i in range(count)]
    return None


def _progress(
    have: list[bool] | None,
    layout: list[tuple[int, bool]] | None,
    info: Mapping[bytes, Any] | None,
    priorities: tuple[int, ...] | None,
) -> tuple[float, bool]:
    """(the fraction of wanted pieces had, whether every wanted piece is had)."""
    if have is None or layout is None or info is None:
        return 0.0, False
    piece_length = _int(info.get(b"piece length"))
    wanted: set[int] = set()
    offset, real_index = 0, 0
    for size, pad in layout:
        if not pad:
            priority = (
                priorities[real_index]
                if priorities and real_index < len(priorities)
                else DEFAULT_PRIORITY
            )
            if priority > 0 and size > 0:
                wanted.update(
                    range(offset // piece_length, (offset + size - 1) // piece_length + 1)
                )
            real_index += 1
        offset += size
    wanted &= set(range(len(have)))
    if not wanted:
        return 0.0, False
    done = sum(1 for piece in wanted if have[piece])
    return done / len(wanted), done == len(wanted)


def _status(resume: Mapping[bytes, Any], progress: float, finished: bool) -> DownloadStatus:
    if finished:
        return DownloadStatus.COMPLETED
    # dlkeeper pauses a download by also taking it out of libtorrent's queue (not auto-managed);
    # a paused, auto-managed torrent is merely queued.
    if resume.get(b"paused") == 1 and resume.get(b"auto_managed") == 0:
        return DownloadStatus.PAUSED
    return DownloadStatus.DOWNLOADING if progress > 0 else DownloadStatus.QUEUED


def _magnet(info_hash: str, name: str, resume: Mapping[bytes, Any]) -> str:
    topic = f"urn:btih:{info_hash}" if len(info_hash) == 40 else f"urn:btmh:1220{info_hash}"
    parts = [f"xt={topic}", f"dn={_quote(name)}"]
    trackers = resume.get(b"trackers")
    if isinstance(trackers, list):
        for tier in trackers:
            for url in tier if isinstance(tier, list) else []:
                text = _text(url)
                if text:
                    parts.append(f"tr={_quote(text)}")
    return "magnet:?" + "&".join(parts)


def _quote(text: str) -> str:
    return quote(text, safe="")


# --- reconciling a backup with the .torrent and .fastresume files -------------------------------


@dataclass(frozen=True)
class Reconciled:
    """A backup merged with the kept files. `torrents` are .torrent files to write back (made
    from resume data); `dropped` are the backup's entries left out, with why, for the
    quarantine file; `notes` say, one sentence each, what differs from the backup."""

    downloads: dict[str, DownloadRecord]
    torrents: dict[str, bytes]
    dropped: dict[str, Rejected]
    notes: tuple[str, ...]
    skipped: dict[str, str]  # task_id -> why its files gave no record (and no backup has it)


def reconcile(
    backup: Mapping[str, DownloadRecord] | None,
    backup_saved_ns: int | None,
    paths: Layout,
    set_aside: Mapping[str, str | None] | None = None,
) -> Reconciled:
    """What the state should be, from a backup (None: there is none that loads; `backup_saved_ns`
    is its mtime) and the `.torrent`/`.fastresume` files in `{download_path}/torrents/`.

    - Every download of the backup is kept as it is (peers, metadata, magnet, save path,
      priorities), except that resume data written at or after the backup (by mtime) gives its
      pause state, progress and completion: the backup is one write behind, and every pause,
      resume and completion saves resume data after the state write that made it. A finished
      (completed or failed) download of the backup stays as it is. A kept .torrent fills a
      magnet's `torrent_file_path` (metadata that came after the backup). When its files are of
      another torrent, it was cancelled and added again under its id after the backup: the
      files' download replaces it.
    - A download of the backup whose own .torrent copy (`torrent_file_path` in torrents/) and
      resume data are both gone is left out (into `dropped`): only a cancel or an ack deletes
      both, so it was forgotten after the backup was written. A magnet that never had metadata
      leaves no files at all, so it is always kept: its cancel in the very write that was lost
      cannot be told from no cancel, and losing a download is worse than the bot cancelling
      it again. Nothing is left out while `torrents/` itself is missing (outside damage).
    - Every download the files have and the backup lacks is added from them, as `rebuild`
      recreates it, unless it is in `set_aside` (task_id -> info hash: the quarantine file,
      which `dlkeeper-state remove` and `repair` leave the files of) or its torrent is already
      the backup's under another id.
    """
    rebuilt = rebuild_records(paths)
    with_files = set(rebuilt.downloads) | set(rebuilt.skipped)
    set_aside = set_aside or {}
    downloads: dict[str, DownloadRecord] = {}
    torrents: dict[str, bytes] = {}
    dropped: dict[str, Rejected] = {}
    notes: list[str] = []
    for task_id, kept in (backup or {}).items():
        found = rebuilt.downloads.get(task_id)
        if found is None:
            if task_id not in with_files and _forgotten(kept, paths):
                reason = (
                    "its .torrent and resume data are gone: it was cancelled or acknowledged "
                    "after the backup was written"
                )
                dropped[task_id] = Rejected(record_json(kept), reason)
                notes.append(f"{task_id}: left out: {reason}")
            else:
                downloads[task_id] = kept
            continue
        if kept.info_hash is not None and found.record.info_hash != kept.info_hash:
            reason = (
                f"its files are of the torrent {found.record.info_hash}, not "
                f"{kept.info_hash}: it was cancelled and added again after the backup"
            )
            dropped[task_id] = Rejected(record_json(kept), reason)
            notes.append(f"{task_id}: {reason}; the download of its files is kept")
            downloads[task_id] = found.record
            if found.torrent is not None:
                torrents[task_id] = found.torrent
            continue
        merged, changes = _merge(kept, found, backup_saved_ns)
        downloads[task_id] = merged
        if changes:
            notes.append(f"{task_id}: {', '.join(changes)}")
        if found.torrent is not None and merged.torrent_file_path == str(
            paths.torrent_path(task_id)
        ):
            torrents[task_id] = found.torrent
    owners = {record.info_hash: task_id for task_id, record in downloads.items()}
    for task_id, found in rebuilt.downloads.items():
        if task_id in downloads or task_id in dropped:
            continue
        record = found.record
        if task_id in set_aside and set_aside[task_id] in (None, record.info_hash):
            notes.append(
                f"{task_id}: its files are not used: it was taken out of the state "
                "(it is in the quarantine file)"
            )
            continue
        owner = owners.get(record.info_hash)
        if owner is not None:
            notes.append(f"{task_id}: its files are not used: its torrent is {owner}'s")
            continue
        downloads[task_id] = record
        owners[record.info_hash] = task_id
        if found.torrent is not None:
            torrents[task_id] = found.torrent
        if backup is not None:
            notes.append(f"{task_id}: added from its files (the backup does not hold it)")
        notes.extend(f"{task_id}: {note}" for note in found.notes)
    skipped = {t: why for t, why in rebuilt.skipped.items() if t not in downloads}
    return Reconciled(downloads, torrents, dropped, tuple(notes), skipped)


def _forgotten(record: DownloadRecord, paths: Layout) -> bool:
    """Whether the download's own files are gone as only a cancel or an ack removes them."""
    if not paths.torrents_dir.is_dir() or record.torrent_file_path is None:
        return False
    own = paths.torrent_path(record.task_id)
    if Path(record.torrent_file_path) != own:
        return False  # a .torrent kept elsewhere (a migrated file): a cancel leaves it
    return not own.exists() and not paths.resume_path(record.task_id).exists()


def _merge(
    kept: DownloadRecord, found: RebuiltDownload, backup_saved_ns: int | None
) -> tuple[DownloadRecord, list[str]]:
    """The backup's record with what its newer files know; the changes, said for a note."""
    files = found.record
    update: dict[str, Any] = {}
    changes: list[str] = []
    if kept.info_hash is None:
        update["info_hash"] = files.info_hash
    if kept.torrent_file_path is None and files.torrent_file_path is not None:
        update["torrent_file_path"] = files.torrent_file_path
        changes.append("its .torrent copy (metadata that came after the backup) is used")
        if kept.name in ("", kept.info_hash):
            update["name"] = files.name
    newer = found.resume_saved_ns is not None and (
        backup_saved_ns is None or found.resume_saved_ns >= backup_saved_ns
    )
    if newer and kept.status not in FINISHED_STATUSES:
        taken: list[str] = []
        status = _newer_status(kept.status, files.status)
        if status is not kept.status:
            update["status"] = status
            taken.append(f"{status} (the backup says {kept.status})")
        if status is DownloadStatus.COMPLETED:
            update["progress"] = 1.0
            update["completed_at"] = files.completed_at
        elif found.progress_known and files.progress != kept.progress:
            update["progress"] = files.progress
            taken.append(f"progress {files.progress:.0%} (the backup says {kept.progress:.0%})")
        if taken:
            changes.append(f"{' and '.join(taken)}, from resume data saved after the backup")
    return (kept.model_copy(update=update) if update else kept), changes


def _newer_status(backup: DownloadStatus, files: DownloadStatus) -> DownloadStatus:
    """The status of an active download whose resume data is newer than the backup."""
    if files in (DownloadStatus.COMPLETED, DownloadStatus.PAUSED):
        return files
    if backup is DownloadStatus.PAUSED:
        return files  # resumed after the backup
    if files is DownloadStatus.DOWNLOADING:
        return files
    return backup  # queued by the files' measure, which cannot tell downloading from queued


def quarantined_downloads(quarantine: bytes | None) -> dict[str, str | None]:
    """task_id -> info hash of every entry in a quarantine file (see `merge_quarantine`);
    empty for none, or for a file that is not one."""
    if quarantine is None:
        return {}
    try:
        data = orjson.loads(quarantine)
    except orjson.JSONDecodeError:
        return {}
    entries = data.get("downloads") if isinstance(data, dict) else None
    found: dict[str, str | None] = {}
    for entry in entries.values() if isinstance(entries, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("task_id"), str):
            info_hash = entry.get("info_hash")
            found[entry["task_id"]] = info_hash if isinstance(info_hash, str) else None
    return found
