"""The session actor's commands, its replies, and the events it publishes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from actors.messages.base import Message
from actors.state import DownloadRecord, FilePriority, TaskId


class AddDownload(Message):
    """Put a persisted download into the session (its .torrent copy or magnet, its resume data,
    priorities, pause state and peers). A download already in the session is left as it is."""

    kind: Literal["start_download"] = "start_download"
    record: DownloadRecord
    # A download just added: it has no resume data yet, and `torrent_b64` is the .torrent just
    # kept for it (None for a magnet), so nothing needs reading back from disk.
    fresh: bool = False
    torrent_b64: str | None = None


class PauseDownload(Message):
    kind: Literal["pause_download"] = "pause_download"
    task_id: TaskId


class ResumeDownload(Message):
    kind: Literal["resume_download"] = "resume_download"
    task_id: TaskId


class RemoveDownload(Message):
    """Take a download out of the session for good (a cancel or an ack): its kept .torrent and
    resume data are deleted; its downloaded files stay unless `delete_files`."""

    kind: Literal["stop_download"] = "stop_download"
    task_id: TaskId
    delete_files: bool = False


class RetryDownload(Message):
    """Start a failed download again, as saved in `record` (now active): out of the session if
    it is still there (in libtorrent's error state), its resume data deleted, then added again
    from its kept .torrent or magnet without resume data, so libtorrent checks the files on
    disk and fetches only what they lack. Its .torrent copy and its files are kept."""

    kind: Literal["retry_download"] = "retry_download"
    record: DownloadRecord


class SetDownloadFiles(Message):
    kind: Literal["set_download_files"] = "set_download_files"
    task_id: TaskId
    file_priorities: tuple[FilePriority, ...]


class GetDownloadStatus(Message):
    """Live status of one download, or of all when `task_id` is None."""

    kind: Literal["get_download_status"] = "get_download_status"
    task_id: TaskId | None = None


class SaveAllResumeData(Message):
    """Save fast-resume data of every changed download (of all: `only_if_modified=False`)."""

    kind: Literal["save_all_resume_data"] = "save_all_resume_data"
    only_if_modified: bool = True


class GetSessionStats(Message):
    kind: Literal["get_session_stats"] = "get_session_stats"


class AwaitReplayed(Message):
    """Answered once the first worker is up and every persisted download was replayed."""

    kind: Literal["await_replayed"] = "await_replayed"


SessionCommand = Annotated[
    AddDownload
    | PauseDownload
    | ResumeDownload
    | RemoveDownload
    | RetryDownload
    | SetDownloadFiles
    | GetDownloadStatus
    | SaveAllResumeData
    | GetSessionStats
    | AwaitReplayed,
    Field(discriminator="kind"),
]


class SessionStatsReply(Message):
    kind: Literal["session_stats_reply"] = "session_stats_reply"
    worker_restarts: int
    resumed_at_start: int
    resume_failures: int
    worker_pid: int | None
    heartbeat_age: float | None  # seconds since the worker last answered a ping


class DownloadMetadataKept(Message):
    """A magnet's metadata arrived and its .torrent copy is on disk at `torrent_path`."""

    kind: Literal["download_metadata_kept"] = "download_metadata_kept"
    task_id: TaskId
    torrent_path: str
    name: str


class DownloadFinished(Message):
    """libtorrent finished the download: every wanted piece is on disk and checked."""

    kind: Literal["download_finished"] = "download_finished"
    task_id: TaskId


class DownloadErrored(Message):
    """The download cannot go on: a libtorrent error, or it could not be replayed."""

    kind: Literal["download_errored"] = "download_errored"
    task_id: TaskId
    error: str


class DownloadStateChanged(Message):
    """libtorrent moved the download to another state (checking_files, downloading, ...)."""

    kind: Literal["download_state_changed"] = "download_state_changed"
    task_id: TaskId
    state: str
    previous: str


class DownloadProgressKept(Message):
    """New fast-resume data is on disk; `progress` is what it holds, for the state file."""

    kind: Literal["download_progress_kept"] = "download_progress_kept"
    task_id: TaskId
    progress: float


class WorkerRestarted(Message):
    """The worker died or hung and a new one is up; its downloads are replayed into it next."""

    kind: Literal["worker_restarted"] = "worker_restarted"
    restarts: int
    reason: str


SessionEvent = (
    DownloadMetadataKept
    | DownloadFinished
    | DownloadErrored
    | DownloadStateChanged
    | DownloadProgressKept
    | WorkerRestarted
)
