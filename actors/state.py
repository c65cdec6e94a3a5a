"""The persisted state: the schema of `downloads.json` and the migrations between its versions.

Shared by the persistence actor and the `dlkeeper-state` recovery commands. Pure: no file is
opened for writing here (`actors.statefile` does that). A version-N file is turned into the
current one by applying `MIGRATIONS[N]`, `MIGRATIONS[N+1]`, ... to its decoded JSON, then
validating the result against `StateFile`; adding version 2 is one function in that table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.atomic import read_small_file
from actors.errors import CorruptState, DlkeeperError, StateTooNew
from actors.metainfo import MAX_TORRENT_BYTES, magnet_info_hash, torrent_info_hash

log = logging.getLogger(__name__)

CURRENT_VERSION = 1
TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

TaskId = Annotated[str, Field(pattern=TASK_ID_PATTERN)]
FilePriority = Annotated[int, Field(ge=0, le=7)]
Progress = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class DownloadStatus(StrEnum):
    """The statuses a download can have in the state file."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"


ACTIVE_STATUSES = frozenset(
    {DownloadStatus.QUEUED, DownloadStatus.DOWNLOADING, DownloadStatus.PAUSED}
)
FINISHED_STATUSES = frozenset({DownloadStatus.COMPLETED, DownloadStatus.FAILED})


def _as_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


class DownloadRecord(BaseModel):
    """One download as persisted (CONTRACT section 3). Immutable: changes make a new record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: TaskId
    name: str
    info_hash: str | None
    created_at: AwareDatetime
    status: DownloadStatus
    magnet_link: str | None = None
    torrent_file_path: str | None = None
    save_path: str
    file_priorities: tuple[FilePriority, ...] = ()
    peers: tuple[str, ...] = ()
    torrent_metadata: dict[str, Any] = Field(default_factory=dict)
    validation_metadata: dict[str, Any] = Field(default_factory=dict)
    progress: Progress = 0.0
    completed_at: AwareDatetime | None = None
    error: str | None = None

    _utc = field_validator("created_at", "completed_at")(_as_utc)

    @model_validator(mode="after")
    def _has_a_source(self) -> DownloadRecord:
        if self.magnet_link is None and self.torrent_file_path is None:
            raise ValueError("a download needs a magnet_link or a torrent_file_path")
        return self

    def to_json(self) -> bytes:
        """The record's JSON as written in the state file."""
        return orjson.dumps(self.model_dump(), option=orjson.OPT_UTC_Z)


class StateFile(BaseModel):
    """The whole current-version file: `{"version": 1, "downloads": {task_id: record}}`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1]
    downloads: dict[str, DownloadRecord]

    @model_validator(mode="after")
    def _keys_are_task_ids(self) -> StateFile:
        for key, record in self.downloads.items():
            if key != record.task_id:
                raise ValueError(f"entry {key!r} holds task_id {record.task_id!r}")
        return self


# In the state file a record sits two levels down ({"downloads": {task_id: record}}), and the
# commands that show or set aside whole files encode it there.
_DEPTH_IN_FILE = 2


def storing_problem(record: DownloadRecord) -> str | None:
    """Why `record` cannot be written to the state file, in one sentence naming the field (a
    value nested deeper than orjson writes, 254 levels, an integer beyond 64 bits, ...); None
    when it can. orjson reads far more than it writes, so a request can carry such a value."""
    fields = record.model_dump()
    if _encoding_error(fields, _DEPTH_IN_FILE) is None:
        return None
    for name, value in fields.items():
        error = _encoding_error({name: value}, _DEPTH_IN_FILE)
        if error is not None:
            return f"{name} cannot be saved in the state file: {error}"
    return f"download {record.task_id} cannot be saved in the state file"


def _encoding_error(value: object, depth: int) -> str | None:
    """orjson's refusal of `value` placed `depth` levels down, or None."""
    for _ in range(depth):
        value = {"": value}
    try:
        orjson.dumps(value, option=orjson.OPT_UTC_Z)
    except TypeError as exc:  # orjson.JSONEncodeError
        reason = str(exc)
        return "it is nested too deeply" if reason == "Recursion limit reached" else reason
    return None


def encode_state(downloads: Mapping[str, DownloadRecord]) -> bytes:
    """The bytes of a current-version state file; one download per line, for people who grep."""
    return encode_entries([encode_entry(task_id, r) for task_id, r in downloads.items()])


def encode_entry(task_id: str, record: DownloadRecord) -> bytes:
    """One `"task_id":{...}` line of the state file."""
    return orjson.dumps(task_id) + b":" + record.to_json()


def encode_entries(entries: Iterable[bytes]) -> bytes:
    """Joins lines made by `encode_entry` into a state file."""
    return b"".join(
        (b'{"version":%d,"downloads":{\n' % CURRENT_VERSION, b",\n".join(entries), b"\n}}\n")
    )


# --- decoding and migrations --------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationContext:
    """What a migration may need to fill new fields."""

    download_path: Path


@dataclass(frozen=True)
class DecodedState:
    downloads: dict[str, DownloadRecord]
    from_version: int


Migration = Callable[[dict[str, Any], MigrationContext], dict[str, Any]]

_V0_FIELDS = (
    "task_id",
    "name",
    "created_at",
    "status",
    "magnet_link",
    "torrent_file_path",
    "file_priorities",
    "torrent_metadata",
    "validation_metadata",
)


def migrate_v0_to_v1(data: dict[str, Any], context: MigrationContext) -> dict[str, Any]:
    """The original design's file (`{task_id: entry}`, no version) to version 1.

    Every v0 field is kept. New fields: `info_hash` from the .torrent or the magnet when either
    can be read (else null, for the session to fill), `save_path` = the configured download path
    (v0 had one download folder), no peers, progress 0. A naive `created_at` was written with
    the machine's local time, so it is read as local time and stored as UTC.
    """
    downloads: dict[str, Any] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise CorruptState(f"v0 entry {key!r} is not an object")
        unknown = sorted(set(entry) - set(_V0_FIELDS))
        if unknown:
            log.warning(
                "v0 entry %s: dropping unknown fields %s (kept in the v0 backup)", key, unknown
            )
        record = {name: entry[name] for name in _V0_FIELDS if name in entry}
        record["created_at"] = _v0_time(entry.get("created_at"))
        record["info_hash"] = _v0_info_hash(entry)
        record["save_path"] = str(context.download_path)
        record["peers"] = []
        record["progress"] = 0.0
        record["completed_at"] = None
        record["error"] = None
        for mapping in ("torrent_metadata", "validation_metadata"):
            if record.get(mapping) is None:
                record[mapping] = {}
        if record.get("file_priorities") is None:
            record["file_priorities"] = []
        downloads[key] = record
    return {"version": 1, "downloads": downloads}


def _v0_time(value: object) -> object:
    if not isinstance(value, str):
        return value  # validation of the v1 record rejects it
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value
    return parsed.astimezone(UTC).isoformat()


def _v0_info_hash(entry: dict[str, Any]) -> str | None:
    path = entry.get("torrent_file_path")
    if isinstance(path, str) and path:
        try:
            return torrent_info_hash(read_small_file(Path(path), MAX_TORRENT_BYTES))
        except (OSError, DlkeeperError) as exc:
            log.warning(
                "v0 entry %s: cannot read info hash from %s: %s", entry.get("task_id"), path, exc
            )
    magnet = entry.get("magnet_link")
    if isinstance(magnet, str) and magnet:
        try:
            return magnet_info_hash(magnet)
        except DlkeeperError as exc:
            log.warning("v0 entry %s: %s", entry.get("task_id"), exc)
    return None


MIGRATIONS: dict[int, Migration] = {0: migrate_v0_to_v1}


def file_version(data: object) -> int:
    """The schema version of decoded state JSON: its `version`, or 0 for the unversioned v0."""
    if not isinstance(data, dict):
        raise CorruptState("the state file is not a JSON object")
    version = data.get("version")
    if version is None or isinstance(version, dict):
        return 0  # no version key (or a v0 download whose task_id is "version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptState(f"the state file has an invalid version {version!r}")
    return version


def decode_state(raw: bytes, path: Path, context: MigrationContext) -> DecodedState:
    """Parses, migrates and validates a state file's bytes.

    Raises `CorruptState` for anything that is not a valid file of a known version and
    `StateTooNew` for a file from a newer dlkeeper. Never anything else.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptState(f"not JSON: {exc}") from None
    version = file_version(data)
    if version > CURRENT_VERSION:
        raise StateTooNew(path, version, CURRENT_VERSION)
    try:
        for step in range(version, CURRENT_VERSION):
            data = MIGRATIONS[step](data, context)
        state = StateFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CorruptState(
            f"invalid state file at {where or 'top level'}: {first['msg']}"
        ) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise CorruptState(f"invalid state file: {exc}") from None
    if _encoding_error(data, 0) is not None:
        # A hand-edited value orjson reads but cannot write: every later write would fail.
        for task_id, record in state.downloads.items():
            problem = storing_problem(record)
            if problem is not None:
                raise CorruptState(f"invalid state file at downloads.{task_id}: {problem}")
    return DecodedState(downloads=dict(state.downloads), from_version=version)
