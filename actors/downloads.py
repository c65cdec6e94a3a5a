"""How a download looks to the bot: DownloadInfo and the durable events, from a saved record,
libtorrent's live status when there is one, and the kept .torrent when there is not."""

from __future__ import annotations

from pathlib import Path

from actors.atomic import read_small_file
from actors.errors import DlkeeperError
from actors.messages.wire import (
    DownloadCompletedEvent,
    DownloadFailedEvent,
    DownloadInfo,
    FileInfo,
    LiveStatus,
)
from actors.messages.worker import TorrentStatus
from actors.metainfo import MAX_TORRENT_BYTES, torrent_files
from actors.state import DownloadRecord, DownloadStatus

DEFAULT_PRIORITY = 4  # libtorrent's

_LOADING_STATES = frozenset({"checking_resume_data", "queued_for_checking"})
_LIVE_STATES: dict[str, LiveStatus] = {
    "checking_files": "checking",
    "checking_resume_data": "checking",
    "queued_for_checking": "checking",
    "allocating": "checking",
    "downloading_metadata": "fetching_metadata",
    "downloading": "downloading",
    # `completed` comes from the saved status only: until the monitor has saved the completion
    # there is no completed_at, `ack` refuses it and no download.completed was sent.
    "finished": "downloading",
    "seeding": "downloading",
}


def live_status(record: DownloadRecord, live: TorrentStatus | None) -> LiveStatus:
    """The contract's status: the saved one for paused and finished downloads, else libtorrent's
    (a download that libtorrent's queue holds back, or that waits for disk space, is `queued`)."""
    if record.status in (DownloadStatus.COMPLETED, DownloadStatus.FAILED, DownloadStatus.PAUSED):
        return record.status.value  # type: ignore[return-value]
    if live is None:
        return record.status.value  # type: ignore[return-value]
    if live.waiting_for_space is not None:
        return "queued"
    if live.error:
        return "failed"
    if _held_in_queue(live):
        return "queued"
    return _LIVE_STATES.get(live.state, "downloading")


def kept_files(record: DownloadRecord) -> tuple[FileInfo, ...]:
    """The files listed by the download's .torrent copy, at the paths libtorrent writes them
    (never the listed ones, which may hold `..`), with its saved priorities; empty when there is
    no readable copy (a magnet still fetching its metadata)."""
    if not record.torrent_file_path:
        return ()
    try:
        files = torrent_files(read_small_file(Path(record.torrent_file_path), MAX_TORRENT_BYTES))
    except (OSError, DlkeeperError):
        return ()
    priorities = record.file_priorities
    return tuple(
        FileInfo(
            path=name,
            size=size,
            priority=priorities[index] if index < len(priorities) else DEFAULT_PRIORITY,
        )
        for index, (name, size) in enumerate(files)
    )


def download_info(record: DownloadRecord, live: TorrentStatus | None) -> DownloadInfo:
    """The DownloadInfo of a saved download, with libtorrent's live status if it has one."""
    if live is not None and live.has_metadata:
        # libtorrent applies priorities on its disk thread, so it may still report the old ones
        # just after a set_files: the saved ones are what the download is set to.
        saved = record.file_priorities
        use_saved = len(saved) == len(live.files)
        files = tuple(
            FileInfo(path=f.path, size=f.size, priority=saved[index] if use_saved else f.priority)
            for index, f in enumerate(live.files)
        )
    else:
        files = kept_files(record)
    finished = record.status is DownloadStatus.COMPLETED
    loading = live is not None and live.state in _LOADING_STATES
    total = live.total_bytes if live is not None else sum(f.size for f in files if f.priority)
    status = live_status(record, live)
    # libtorrent's rates are moving averages that fade for seconds after a pause or the end.
    waiting_for_space = live.waiting_for_space if live is not None else None
    stopped = status in ("paused", "failed") or waiting_for_space is not None
    downloading = not stopped and status != "completed"
    return DownloadInfo(
        task_id=record.task_id,
        name=record.name or (live.name if live is not None else ""),
        info_hash=record.info_hash or (live.info_hash if live is not None else None),
        status=status,
        progress=1.0 if finished else _progress(record, live, loading=loading),
        total_bytes=total,
        downloaded_bytes=(
            live.downloaded_bytes if live is not None else (total if finished else 0)
        ),
        download_rate=live.download_rate if live is not None and downloading else 0,
        upload_rate=live.upload_rate if live is not None and not stopped else 0,
        num_peers=live.num_peers if live is not None and not stopped else 0,
        save_path=record.save_path,
        created_at=record.created_at,
        completed_at=record.completed_at,
        # A wait for space is not saved (a restart meets the full disk again), only shown.
        error=waiting_for_space if waiting_for_space and status == "queued" else record.error,
        files=files,
    )


def _held_in_queue(live: TorrentStatus) -> bool:
    return live.paused and live.auto_managed and not live.finished


def _progress(record: DownloadRecord, live: TorrentStatus | None, *, loading: bool) -> float:
    if live is None:
        return record.progress
    if live.state == "checking_files":
        return record.progress  # libtorrent reports how far the check is, not the download
    # While libtorrent still reads the resume data, or holds the download in its queue after a
    # restart, it may report 0: the saved progress is truer.
    if loading or _held_in_queue(live):
        return max(live.progress, record.progress)
    return live.progress


def completed_event(record: DownloadRecord, seq: int) -> DownloadCompletedEvent:
    assert record.completed_at is not None, "a completed download has its completion time"
    return DownloadCompletedEvent(
        seq=seq,
        task_id=record.task_id,
        name=record.name,
        info_hash=record.info_hash,
        save_path=record.save_path,
        files=kept_files(record),
        torrent_metadata=record.torrent_metadata,
        validation_metadata=record.validation_metadata,
        completed_at=record.completed_at,
    )


def failed_event(record: DownloadRecord, seq: int) -> DownloadFailedEvent:
    return DownloadFailedEvent(
        seq=seq,
        task_id=record.task_id,
        name=record.name,
        error=record.error or "unknown error",
        torrent_metadata=record.torrent_metadata,
        validation_metadata=record.validation_metadata,
    )
