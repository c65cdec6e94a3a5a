"""The worker protocol: one JSON object per line on the libtorrent worker's stdin (commands,
each with an `id`) and stdout (replies to those ids, and events). Bytes travel as base64."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from actors.messages.base import DoneReply, Message
from actors.state import FilePriority, TaskId


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
    # Its file system is full: added held, waiting for space with this reason (see WaitForSpace).
    wait_for_space: str | None = None


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


class SetTorrentFiles(WorkerCommand):
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


class WaitForSpace(WorkerCommand):
    """Hold these downloads until `SpaceBack`: paused in libtorrent and out of its queue, with
    whether they were running kept aside (a pause or resume meanwhile changes only that), and
    `reason` as their status's `waiting_for_space`. For one already waiting: the new reason.
    Downloads not in the session are skipped."""

    kind: Literal["wait_for_space"] = "wait_for_space"
    task_ids: tuple[TaskId, ...]
    reason: str


class SpaceBack(WorkerCommand):
    """Space is back for these downloads: each goes on as it was before it waited (a running
    one back to libtorrent's queue), unless paused meanwhile. Others are skipped. Also the
    answer to a `MetadataReceived` whose files fit: the worker writes none until it comes."""

    kind: Literal["space_back"] = "space_back"
    task_ids: tuple[TaskId, ...]


class Ping(WorkerCommand):
    kind: Literal["ping"] = "ping"


WorkerRequest = Annotated[
    ConfigureSession
    | AddTorrent
    | PauseTorrent
    | ResumeTorrent
    | RemoveTorrent
    | SetTorrentFiles
    | GetTorrentStatus
    | SaveResumeData
    | WaitForSpace
    | SpaceBack
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
    save_path: str = ""
    waiting_for_space: str | None = None  # why it is held (WaitForSpace), while it is


class WireError(Message):
    """An error crossing the process boundary: the contract code, the text, the traceback."""

    code: str
    message: str
    task_id: str | None = None  # the download the error is about, when it is about one
    type: str
    traceback: str | None = None


class TorrentAddedReply(Message):
    """The answer to `add` (and to a retried one): the download is in the session."""

    kind: Literal["torrent_added_reply"] = "torrent_added_reply"
    info_hash: str


class FilePrioritiesReply(Message):
    """The answer to `set_file_priorities`; not `applied` yet for a magnet still without its
    metadata: the priorities wait for it."""

    kind: Literal["file_priorities_reply"] = "file_priorities_reply"
    applied: bool


class StatusReply(Message):
    """The answer to `status`."""

    kind: Literal["status_reply"] = "status_reply"
    torrents: tuple[TorrentStatus, ...]


class ResumeSavedReply(Message):
    """The answer to `save_resume_data`, once every save it asked for is done or failed."""

    kind: Literal["resume_saved_reply"] = "resume_saved_reply"
    saved: int
    failed: int


class PongReply(Message):
    """The answer to `ping`: the worker's event loop turns."""

    kind: Literal["pong_reply"] = "pong_reply"
    torrents: int


WorkerResult = Annotated[
    TorrentAddedReply
    | FilePrioritiesReply
    | StatusReply
    | ResumeSavedReply
    | PongReply
    | DoneReply,
    Field(discriminator="kind"),
]


class WorkerReply(Message):
    """The answer to the command `id`: its typed `result`, or the `error` it failed with."""

    kind: Literal["reply"] = "reply"
    id: int
    ok: bool
    result: WorkerResult | None = None
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
    """A magnet's metadata arrived; the parent keeps the .torrent, and says whether its files
    fit (`SpaceBack`, or `WaitForSpace`): until then the worker writes none of them."""

    kind: Literal["metadata_received"] = "metadata_received"
    task_id: TaskId
    torrent_b64: str


class TorrentFinished(Message):
    """Every wanted piece is downloaded, checked and handed to the OS (a disk flush completed
    after it); not yet durable: `payload_files` (absolute paths, some perhaps never made) are
    to be fsynced before the finish is recorded."""

    kind: Literal["finished"] = "finished"
    task_id: TaskId
    payload_files: tuple[str, ...] = ()


class TorrentFailed(Message):
    """libtorrent stopped the download on an error (a file error, an invalid resume...)."""

    kind: Literal["failed"] = "failed"
    task_id: TaskId
    error: str


class TorrentOutOfSpace(Message):
    """A write of the download failed for want of space (ENOSPC, EDQUOT): the worker now holds
    it as `WaitForSpace` does, and the session decides when space is back. Sent once a wait."""

    kind: Literal["out_of_space"] = "out_of_space"
    task_id: TaskId
    error: str
    save_path: str


class TorrentStateChanged(Message):
    kind: Literal["state_changed"] = "state_changed"
    task_id: TaskId
    state: str
    previous: str


class ResumeDataSaved(Message):
    """Resume data, held until a disk flush after it completed: the bytes it claims are in the
    OS's hands, not yet durable: `payload_files` (absolute paths, some perhaps never made) are
    to be fsynced before it is kept."""

    kind: Literal["resume_data_saved"] = "resume_data_saved"
    task_id: TaskId
    resume_b64: str
    progress: float  # of the download, when the resume data was taken
    payload_files: tuple[str, ...] = ()


WorkerOutput = Annotated[
    WorkerReply
    | WorkerReady
    | SettingsRejected
    | MetadataReceived
    | TorrentFinished
    | TorrentFailed
    | TorrentOutOfSpace
    | TorrentStateChanged
    | ResumeDataSaved,
    Field(discriminator="kind"),
]
WORKER_OUTPUT: TypeAdapter[WorkerOutput] = TypeAdapter(WorkerOutput)
