"""The message API on the socket (CONTRACT.md section 2): results, replies and events.

Requests are JSON objects with `id`, `op` and the op's parameters at the top level; a reply
is {"id", "ok": true, "result"} or {"id", "ok": false, "error": {"code", "message"}}.
This module imports only pydantic: the bot's client loads it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field, TypeAdapter

from actors.messages.base import Message

RequestId = int | str
# The bounds of a subscription's `progress_interval`, in seconds.
MIN_PROGRESS_INTERVAL = 0.05
MAX_PROGRESS_INTERVAL = 86400.0
LiveStatus = Literal[
    "queued", "checking", "fetching_metadata", "downloading", "paused", "completed", "failed"
]


class FileInfo(Message):
    path: str
    size: int
    priority: int


class DownloadInfo(Message):
    task_id: str
    name: str
    info_hash: str | None
    status: LiveStatus
    progress: float
    total_bytes: int
    downloaded_bytes: int
    download_rate: int
    upload_rate: int
    num_peers: int
    save_path: str
    created_at: AwareDatetime
    completed_at: AwareDatetime | None
    error: str | None
    files: tuple[FileInfo, ...]


class PingResult(Message):
    version: str
    ready: bool
    problems: tuple[str, ...]  # one sentence per current problem; empty while healthy


class AddResult(Message):
    task_id: str
    info_hash: str
    status: LiveStatus


class ListResult(Message):
    downloads: tuple[DownloadInfo, ...]


class StatsResult(Message):
    downloads: dict[str, int]
    resumed_at_start: int
    resume_failures: int
    worker_restarts: int
    uptime: float
    problems: tuple[str, ...]
    free_bytes: int | None  # on download_path's file system; None when it cannot be read


class EmptyResult(Message):
    pass


class ApiError(Message):
    code: str
    message: str
    task_id: str | None = None  # for `duplicate`: the download that has this torrent
    needed_bytes: int | None = None  # for `no_space`: what the add and those in progress need
    free_bytes: int | None = None  # for `no_space`: free on the add's file system


class ApiReply(Message):
    id: RequestId | None
    ok: bool
    result: dict[str, Any] | None = None
    error: ApiError | None = None


class DownloadCompletedEvent(Message):
    event: Literal["download.completed"] = "download.completed"
    seq: int
    task_id: str
    name: str
    info_hash: str | None
    save_path: str
    files: tuple[FileInfo, ...]
    torrent_metadata: dict[str, Any]
    validation_metadata: dict[str, Any]
    completed_at: AwareDatetime


class DownloadFailedEvent(Message):
    event: Literal["download.failed"] = "download.failed"
    seq: int
    task_id: str
    name: str
    error: str
    torrent_metadata: dict[str, Any]
    validation_metadata: dict[str, Any]


class DownloadAddedEvent(Message):
    event: Literal["download.added"] = "download.added"
    seq: int
    task_id: str


class DownloadPausedEvent(Message):
    event: Literal["download.paused"] = "download.paused"
    seq: int
    task_id: str


class DownloadResumedEvent(Message):
    event: Literal["download.resumed"] = "download.resumed"
    seq: int
    task_id: str


class DownloadRemovedEvent(Message):
    event: Literal["download.removed"] = "download.removed"
    seq: int
    task_id: str


class DownloadProgressEvent(Message):
    event: Literal["download.progress"] = "download.progress"
    seq: int
    task_id: str
    progress: float
    download_rate: int
    num_peers: int


ApiEvent = Annotated[
    DownloadCompletedEvent
    | DownloadFailedEvent
    | DownloadAddedEvent
    | DownloadPausedEvent
    | DownloadResumedEvent
    | DownloadRemovedEvent
    | DownloadProgressEvent,
    Field(discriminator="event"),
]
API_EVENTS: TypeAdapter[ApiEvent] = TypeAdapter(ApiEvent)
