"""The persistence actor's commands and replies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field, field_validator

from actors.messages.base import Message
from actors.state import DownloadRecord, DownloadStatus, FilePriority, Progress, TaskId


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


class RetryRecord(Message):
    """Make a failed download active again (a retry): `queued`, its error and completion time
    cleared. Fails with `not_found`, and with `bad_request` when it is not failed."""

    kind: Literal["retry_record"] = "retry_record"
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


StateMutation = AddRecord | UpdateRecord | RemoveRecord | AckRecord | RetryRecord
PersistenceCommand = Annotated[
    AddRecord
    | UpdateRecord
    | RemoveRecord
    | AckRecord
    | RetryRecord
    | GetSnapshot
    | GetRecord
    | GetPersistenceStats,
    Field(discriminator="kind"),
]
