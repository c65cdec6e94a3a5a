"""Every message that crosses an actor boundary, in one module.

Frozen pydantic models with `extra="forbid"`, tagged by a literal `kind` and decoded through one
`TypeAdapter` per union. Commands are imperative, events past tense, replies end in `Reply`.
Only JSON-safe data: libtorrent objects never leave the worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from actors.state import DownloadRecord, DownloadStatus, FilePriority, Progress, TaskId


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- persistence: commands ----------------------------------------------------------------------


class RecordChanges(Message):
    """Fields of a download to change; only the fields that are set are applied."""

    name: str | None = None
    info_hash: str | None = None
    status: DownloadStatus | None = None
    magnet_link: str | None = None
    torrent_file_path: str | None = None
    save_path: str | None = None
    file_priorities: tuple[FilePriority, ...] | None = None
    peers: tuple[str, ...] | None = None
    progress: Progress | None = None
    completed_at: AwareDatetime | None = None
    error: str | None = None

    @field_validator(
        "name", "status", "save_path", "file_priorities", "peers", "progress", mode="before"
    )
    @classmethod
    def _not_null(cls, value: object) -> object:
        # These fields can be changed but never cleared; None here would mean "clear".
        if value is None:
            raise ValueError("cannot be null")
        return value

    def changed(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class AddRecord(Message):
    """Persist a new download, checked in the same step against every saved one: when its
    task_id exists with the same info hash, the existing download is the answer (a retried add,
    `existed` set); `duplicate` when the task_id is another torrent's, or when the info hash is
    another download's (the error names that download)."""

    kind: Literal["add_record"] = "add_record"
    record: DownloadRecord


class UpdateRecord(Message):
    """Change fields of a download. Fails with `not_found`, and with `StaleChange` when
    `if_status` is given and the download's status is no longer one of them."""

    kind: Literal["update_record"] = "update_record"
    task_id: TaskId
    changes: RecordChanges
    if_status: frozenset[DownloadStatus] | None = None


class RemoveRecord(Message):
    """Forget a download (a cancel). Fails with `not_found`."""

    kind: Literal["remove_record"] = "remove_record"
    task_id: TaskId


class AckRecord(Message):
    """Forget a completed or failed download once the bot has taken it."""

    kind: Literal["ack_record"] = "ack_record"
    task_id: TaskId


class GetSnapshot(Message):
    """All downloads as last saved; never waits for a write."""

    kind: Literal["get_snapshot"] = "get_snapshot"


class GetRecord(Message):
    """One download as last saved; never waits for a write. Fails with `not_found`."""

    kind: Literal["get_record"] = "get_record"
    task_id: TaskId


# --- persistence: replies -----------------------------------------------------------------------


class RecordReply(Message):
    """The download as saved after the command (for a remove or ack: as it was)."""

    kind: Literal["record_reply"] = "record_reply"
    record: DownloadRecord


class AddRecordReply(Message):
    """The download as saved; `existed` when it was there already (nothing was added)."""

    kind: Literal["add_record_reply"] = "add_record_reply"
    record: DownloadRecord
    existed: bool


class SnapshotReply(Message):
    """Every saved download, keyed by task_id."""

    kind: Literal["snapshot_reply"] = "snapshot_reply"
    downloads: dict[str, DownloadRecord]


class GetPersistenceStats(Message):
    """How the state was loaded, and how many writes and mutations were committed since."""

    kind: Literal["get_persistence_stats"] = "get_persistence_stats"


class PersistenceStatsReply(Message):
    kind: Literal["persistence_stats_reply"] = "persistence_stats_reply"
    load_source: str
    migrated_from: int | None
    quarantined: tuple[str, ...]
    load_problems: tuple[str, ...]
    writes: int
    committed_mutations: int


StateMutation = AddRecord | UpdateRecord | RemoveRecord | AckRecord
PersistenceCommand = Annotated[
    AddRecord
    | UpdateRecord
    | RemoveRecord
    | AckRecord
    | GetSnapshot
    | GetRecord
    | GetPersistenceStats,
    Field(discriminator="kind"),
]
PERSISTENCE_COMMANDS: TypeAdapter[PersistenceCommand] = TypeAdapter(PersistenceCommand)


# --- the session worker's wire protocol ----------------------------------------------------------
# One JSON object per line on the worker's stdin (commands, each with an `id`) and stdout (replies
# to those ids, and events). Bytes travel as base64 strings.


class WorkerCommand(Message):
    id: int


class ConfigureSession(WorkerCommand):
    """The first command: start the session with these settings over dlkeeper's defaults."""

    kind: Literal["configure"] = "configure"
    settings: dict[str, str | int | bool]


class AddTorrent(WorkerCommand):
    """Add a download from .torrent bytes, a magnet link, or resume data (plus one of those)."""

    kind: Literal["add"] = "add"
    task_id: TaskId
    torrent_b64: str | None = None
    magnet: str | None = None
    resume_b64: str | None = None
    save_path: str
    file_priorities: tuple[FilePriority, ...] = ()
    paused: bool = False
    peers: tuple[str, ...] = ()


class PauseTorrent(WorkerCommand):
    kind: Literal["pause"] = "pause"
    task_id: TaskId


class ResumeTorrent(WorkerCommand):
    kind: Literal["resume"] = "resume"
    task_id: TaskId


class RemoveTorrent(WorkerCommand):
    kind: Literal["remove"] = "remove"
    task_id: TaskId
    delete_files: bool = False


class SetFilePriorities(WorkerCommand):
    kind: Literal["set_file_priorities"] = "set_file_priorities"
    task_id: TaskId
    file_priorities: tuple[FilePriority, ...]


class GetTorrentStatus(WorkerCommand):
    """Status of one download, or of all when `task_id` is None."""

    kind: Literal["status"] = "status"
    task_id: TaskId | None = None


class SaveResumeData(WorkerCommand):
    """Save resume data of one download, or of every one that changed when `task_id` is None.

    Answered once every requested save has produced a `ResumeDataSaved` event (or failed).
    """

    kind: Literal["save_resume_data"] = "save_resume_data"
    task_id: TaskId | None = None
    only_if_modified: bool = True


class Ping(WorkerCommand):
    kind: Literal["ping"] = "ping"


WorkerRequest = Annotated[
    ConfigureSession
    | AddTorrent
    | PauseTorrent
    | ResumeTorrent
    | RemoveTorrent
    | SetFilePriorities
    | GetTorrentStatus
    | SaveResumeData
    | Ping,
    Field(discriminator="kind"),
]
WORKER_REQUESTS: TypeAdapter[WorkerRequest] = TypeAdapter(WorkerRequest)


class FileEntry(Message):
    path: str
    size: int
    priority: int


class TorrentStatus(Message):
    """What the worker knows of one download right now."""

    task_id: TaskId
    info_hash: str
    name: str
    state: str  # libtorrent's state: checking_files, downloading_metadata, downloading, seeding...
    paused: bool
    auto_managed: bool
    finished: bool
    has_metadata: bool
    progress: float
    total_bytes: int
    downloaded_bytes: int
    download_rate: int
    upload_rate: int
    num_peers: int
    error: str | None
    files: tuple[FileEntry, ...]


class WireError(Message):
    """An error crossing the process boundary: the contract code, the text, the traceback."""

    code: str
    message: str
    type: str
    traceback: str | None = None


class WorkerReply(Message):
    kind: Literal["reply"] = "reply"
    id: int
    ok: bool
    result: dict[str, Any] | None = None
    error: WireError | None = None


class WorkerReady(Message):
    """The session is up with the configured settings."""

    kind: Literal["ready"] = "ready"
    libtorrent_version: str
    listen_port: int


class SettingsRejected(Message):
    """The answer to `configure` when a [libtorrent] key is unknown or of the wrong type."""

    kind: Literal["settings_rejected"] = "settings_rejected"
    key: str
    reason: str


class MetadataReceived(Message):
    """A magnet's metadata arrived; the parent keeps the .torrent."""

    kind: Literal["metadata_received"] = "metadata_received"
    task_id: TaskId
    torrent_b64: str


class TorrentFinished(Message):
    """Every wanted piece is downloaded and checked."""

    kind: Literal["finished"] = "finished"
    task_id: TaskId


class TorrentFailed(Message):
    """libtorrent stopped the download on an error (a file error, an invalid resume...)."""

    kind: Literal["failed"] = "failed"
    task_id: TaskId
    error: str


class TorrentStateChanged(Message):
    kind: Literal["state_changed"] = "state_changed"
    task_id: TaskId
    state: str
    previous: str


class ResumeDataSaved(Message):
    kind: Literal["resume_data_saved"] = "resume_data_saved"
    task_id: TaskId
    resume_b64: str
    progress: float  # of the download, when the resume data was taken


WorkerOutput = Annotated[
    WorkerReply
    | WorkerReady
    | SettingsRejected
    | MetadataReceived
    | TorrentFinished
    | TorrentFailed
    | TorrentStateChanged
    | ResumeDataSaved,
    Field(discriminator="kind"),
]
WORKER_OUTPUT: TypeAdapter[WorkerOutput] = TypeAdapter(WorkerOutput)


# --- the session actor: commands, replies and the events it publishes ----------------------------


class StartDownload(Message):
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


class StopDownload(Message):
    """Take a download out of the session for good (a cancel or an ack): its kept .torrent and
    resume data are deleted; its downloaded files stay unless `delete_files`."""

    kind: Literal["stop_download"] = "stop_download"
    task_id: TaskId
    delete_files: bool = False


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
    StartDownload
    | PauseDownload
    | ResumeDownload
    | StopDownload
    | SetDownloadFiles
    | GetDownloadStatus
    | SaveAllResumeData
    | GetSessionStats
    | AwaitReplayed,
    Field(discriminator="kind"),
]
SESSION_COMMANDS: TypeAdapter[SessionCommand] = TypeAdapter(SessionCommand)


class StatusReply(Message):
    kind: Literal["status_reply"] = "status_reply"
    torrents: tuple[TorrentStatus, ...]


class ResumeSavedReply(Message):
    kind: Literal["resume_saved_reply"] = "resume_saved_reply"
    saved: int
    failed: int


class SessionStatsReply(Message):
    kind: Literal["session_stats_reply"] = "session_stats_reply"
    worker_restarts: int
    resumed_at_start: int
    resume_failures: int
    worker_pid: int | None
    heartbeat_age: float | None  # seconds since the worker last answered a ping


class DoneReply(Message):
    """A command that has nothing to report but that it was done."""

    kind: Literal["done_reply"] = "done_reply"


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


# --- the message API on the socket (CONTRACT section 2) -----------------------------------------
# Requests are JSON objects with `id`, `op` and the op's parameters at the top level; a reply
# is {"id", "ok": true, "result"} or {"id", "ok": false, "error": {"code", "message"}}.

RequestId = int | str
LiveStatus = Literal[
    "queued", "checking", "fetching_metadata", "downloading", "paused", "completed", "failed"
]


class ApiModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileInfo(ApiModel):
    path: str
    size: int
    priority: int


class DownloadInfo(ApiModel):
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


class PingResult(ApiModel):
    version: str
    ready: bool


class AddResult(ApiModel):
    task_id: str
    info_hash: str
    status: LiveStatus


class ListResult(ApiModel):
    downloads: tuple[DownloadInfo, ...]


class StatsResult(ApiModel):
    downloads: dict[str, int]
    resumed_at_start: int
    resume_failures: int
    worker_restarts: int
    uptime: float


class EmptyResult(ApiModel):
    pass


class ApiError(ApiModel):
    code: str
    message: str
    task_id: str | None = None  # for `duplicate`: the download that has this torrent


class ApiReply(ApiModel):
    id: RequestId | None
    ok: bool
    result: dict[str, Any] | None = None
    error: ApiError | None = None


class DownloadCompletedEvent(ApiModel):
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


class DownloadFailedEvent(ApiModel):
    event: Literal["download.failed"] = "download.failed"
    seq: int
    task_id: str
    name: str
    error: str
    torrent_metadata: dict[str, Any]
    validation_metadata: dict[str, Any]


class DownloadAddedEvent(ApiModel):
    event: Literal["download.added"] = "download.added"
    seq: int
    task_id: str


class DownloadPausedEvent(ApiModel):
    event: Literal["download.paused"] = "download.paused"
    seq: int
    task_id: str


class DownloadResumedEvent(ApiModel):
    event: Literal["download.resumed"] = "download.resumed"
    seq: int
    task_id: str


class DownloadRemovedEvent(ApiModel):
    event: Literal["download.removed"] = "download.removed"
    seq: int
    task_id: str


class DownloadProgressEvent(ApiModel):
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
