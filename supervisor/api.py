"""The message API's operations (CONTRACT section 2), behind the socket.

Each mutating operation changes the state file first (its `ok` is sent only after the fsync),
then the libtorrent session, then publishes its event. Bad input is refused with the contract's
error code before anything changes.

The .torrent bytes that adds hold (read from `torrent_path` or decoded from `torrent_b64`) are
charged to one byte budget for the daemon (`TORRENT_BYTES_IN_FLIGHT`), measured before they are
read, and given back with the request's line once it is answered (see supervisor.server):
excess adds wait their turn rather than each holding its own copy at once. It is a budget apart
from the server's for request lines because an add waits for it holding its download's change
lock: the requests queued behind that lock hold line bytes, and in one budget they could keep
the add they wait for from ever getting its turn.

An add of a .torrent is refused with `no_space` when its wanted bytes not on disk yet, plus what
the downloads in progress on the same file system still need, do not fit in the free space less
`min_free_bytes` (see `_SpaceLedger` for how concurrent adds never pass on the same free bytes).
A magnet's sizes are not known at add time: it is not checked here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import itertools
import os
import re
import stat
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.atomic import read_small_file, write_file_atomically
from actors.budget import ByteBudget, held_bytes
from actors.bus import EventBus, Subscription
from actors.downloads import completed_event, download_info, failed_event
from actors.errors import (
    BadRequest,
    DlkeeperError,
    Duplicate,
    InvalidTorrent,
    NoSpace,
    NotFound,
    NotReady,
    PathNotAllowed,
    StateWriteFailed,
    UnknownOp,
)
from actors.layout import replay_torrent
from actors.mailbox import KeyedLock
from actors.messages.base import Message
from actors.messages.persistence import AddRecordReply, RecordChanges
from actors.messages.wire import (
    MAX_PROGRESS_INTERVAL,
    MIN_PROGRESS_INTERVAL,
    AddResult,
    DownloadAddedEvent,
    DownloadCompletedEvent,
    DownloadFailedEvent,
    DownloadInfo,
    DownloadPausedEvent,
    DownloadProgressEvent,
    DownloadRemovedEvent,
    DownloadResumedEvent,
    EmptyResult,
    ListResult,
    PingResult,
    StatsResult,
)
from actors.messages.worker import TorrentStatus
from actors.metainfo import MAX_TORRENT_BYTES, magnet_info_hash, read_torrent
from actors.persistence import Persistence
from actors.problems import Problems
from actors.session import Session
from actors.state import ACTIVE_STATUSES, TASK_ID_PATTERN, DownloadRecord, DownloadStatus
from supervisor import __version__
from supervisor.config import Config

_PEER = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")

Priority = Annotated[int, Field(ge=0, le=7)]
TaskIdParam = Annotated[str, Field(pattern=TASK_ID_PATTERN)]
Metadata = dict[str, Any]

# Bytes of .torrent files held by adds in progress, all connections together: the largest
# .torrent accepted, which so never waits for more than the adds before it. Decoding one is
# pure Python under the GIL, so more of them at once would not go faster, only take more room.
TORRENT_BYTES_IN_FLIGHT = MAX_TORRENT_BYTES
# The problem key of free space on download_path's file system below min_free_bytes.
DISK_LOW = "disk-low"
# Downloads whose remaining bytes an add's space check counts (a paused one needs none now).
NEEDING_STATUSES = frozenset({DownloadStatus.QUEUED, DownloadStatus.DOWNLOADING})


class Params(BaseModel):
    """An operation's parameters: strict types, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


class TaskParams(Params):
    task_id: TaskIdParam


class AddParams(Params):
    magnet: str | None = None
    torrent_b64: str | None = None
    torrent_path: str | None = None
    task_id: TaskIdParam | None = None
    name: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    save_path: str | None = None
    file_priorities: list[Priority] | None = None
    paused: bool = False
    peers: list[str] | None = None
    torrent_metadata: Metadata | None = None
    validation_metadata: Metadata | None = None


class CancelParams(TaskParams):
    delete_files: bool = False


class SetFilesParams(TaskParams):
    file_priorities: list[Priority]


class ApiService:
    """Carries out the operations; one instance per daemon."""

    def __init__(
        self,
        config: Config,
        persistence: Persistence,
        session: Session,
        bus: EventBus,
        problems: Problems | None = None,
    ) -> None:
        self._config = config
        self._problems = problems or Problems()
        self._persistence = persistence
        self._session = session
        self._bus = bus
        self._started = time.monotonic()
        self._download_root = config.download_path.resolve()  # resolved once, not per add
        self._torrent_bytes = ByteBudget(TORRENT_BYTES_IN_FLIGHT)
        # Where dlkeeper keeps its own files: no payload may land there (the state folder too,
        # for a library_path inside download_path).
        layout = config.layout
        self._own_folders = (layout.torrents_dir.resolve(), layout.state_dir.resolve())
        self._changes = KeyedLock()  # one change of a download at a time, in arrival order
        self._space = _SpaceLedger(self._read_in_progress)
        self._ops: dict[str, tuple[type[Params], Callable[[Any], Awaitable[Message]]]] = {
            "ping": (NoParams, self.ping),
            "add": (AddParams, self.add),
            "get": (TaskParams, self.get),
            "list": (NoParams, self.list),
            "pause": (TaskParams, self.pause),
            "resume": (TaskParams, self.resume),
            "cancel": (CancelParams, self.cancel),
            "set_files": (SetFilesParams, self.set_files),
            "ack": (TaskParams, self.ack),
            "retry": (TaskParams, self.retry),
            "stats": (NoParams, self.stats),
        }

    async def call(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        """Runs `op` with `params`; the result as JSON-ready data. Raises `DlkeeperError`."""
        entry = self._ops.get(op)
        if entry is None:
            raise UnknownOp(f"unknown op {op!r}")
        model, handler = entry
        try:
            parsed = model.model_validate(params)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or op
            if first["type"] == "extra_forbidden":
                raise BadRequest(f"{op} has no parameter {where!r}") from None
            raise BadRequest(f"{where}: {first['msg']}") from None
        result = await handler(parsed)
        return result.model_dump(mode="json")

    # --- operations -----------------------------------------------------------------------------

    async def ping(self, _: NoParams) -> PingResult:
        await self._free_bytes()  # a disk low on space is one of the problems
        return PingResult(version=__version__, ready=True, problems=tuple(self._problems.current()))

    async def add(self, params: AddParams) -> AddResult:
        task_id = params.task_id or uuid.uuid4().hex[:16]
        # The lock first, before any await: requests for one download take effect in the
        # order they arrived, so an add and the cancel pipelined behind it are done in turn.
        async with self._changing(task_id):
            record, source = await self._new_record(task_id, params)
            # The space promised to this add, given back once libtorrent has its download.
            with contextlib.ExitStack() as promised:
                if source.torrent is None:
                    added = await self._persistence.add(record)  # checked for duplicates there
                else:
                    added = await self._add_with_torrent(record, source, promised)
                if added.existed:  # a retried add: the download it made, in libtorrent as saved
                    if added.record.status in ACTIVE_STATUSES:
                        await self._session.add(added.record)  # the first may never have got there
                    info = await self._info(added.record)
                    return AddResult(
                        task_id=task_id, info_hash=source.info_hash, status=info.status
                    )
                record = added.record
                await self._start(record, source.torrent)
            self._bus.publish(lambda seq: DownloadAddedEvent(seq=seq, task_id=task_id))
            return AddResult(
                task_id=task_id, info_hash=source.info_hash, status=record.status.value
            )

    async def _new_record(self, task_id: str, params: AddParams) -> tuple[DownloadRecord, _Source]:
        """The download an add asks for, checked; raises the contract's errors."""
        source = await self._source(params)
        save_path = self._save_path(params.save_path)
        if source.files is not None:  # a magnet's files are known only with its metadata
            self._refuse_own_folders(save_path, source.files)
        priorities = tuple(params.file_priorities or ())
        if source.files is not None and priorities and len(priorities) != len(source.files):
            raise BadRequest(
                f"file_priorities has {len(priorities)} entries; "
                f"the torrent has {len(source.files)} files"
            )
        peers = tuple(params.peers or ())
        for peer in peers:
            if not _PEER.match(peer) or not 0 < int(peer.rpartition(":")[2]) < 65536:
                raise BadRequest(f"peers: {peer!r} is not host:port")
        record = DownloadRecord(
            task_id=task_id,
            name=params.name or source.name,
            info_hash=source.info_hash,
            created_at=datetime.now(UTC),
            status=DownloadStatus.PAUSED if params.paused else DownloadStatus.QUEUED,
            magnet_link=source.magnet,
            torrent_file_path=None if source.torrent is None else str(self._torrent_path(task_id)),
            save_path=str(save_path),
            file_priorities=priorities,
            peers=peers,
            torrent_metadata=params.torrent_metadata or {},
            validation_metadata=params.validation_metadata or {},
        )
        return record, source

    async def _add_with_torrent(
        self, record: DownloadRecord, source: _Source, promised: contextlib.ExitStack
    ) -> AddRecordReply:
        """Checks that the download fits (`no_space`; a retried add is not checked again),
        keeps the .torrent copy, then saves the record that names it (never the other way
        round: a saved download always has its copy). The copy is named by the task_id, and
        the caller holds the task_id's change lock: no other add, cancel or ack of it runs
        meanwhile, so a saved download's copy is never overwritten nor deleted. The space
        the download was promised is held in `promised`."""
        task_id = record.task_id
        torrent = source.torrent
        assert torrent is not None and source.files is not None
        try:
            existing: DownloadRecord | None = await self._persistence.get(task_id)
        except NotFound:
            existing = None
        if existing is not None:
            if existing.info_hash != record.info_hash:
                raise Duplicate(
                    f"task_id {task_id} is already the torrent {existing.info_hash}", task_id
                )
            return AddRecordReply(record=existing, existed=True)
        await self._check_space(record, source.files, promised)
        path = self._torrent_path(task_id)
        await anyio.to_thread.run_sync(_keep_torrent, path, torrent)
        try:
            return await self._persistence.add(record)
        except (Duplicate, BadRequest, StateWriteFailed):
            # Refused, nothing saved (another download's torrent, a value the state file cannot
            # hold, a failed write): the copy just written is nobody's.
            await anyio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))
            raise

    async def get(self, params: TaskParams) -> DownloadInfo:
        return await self._info(await self._persistence.get(params.task_id))

    async def list(self, _: NoParams) -> ListResult:
        records = await self._persistence.snapshot()
        live = await self._live_all()
        infos = [download_info(r, live.get(r.task_id)) for r in records.values()]
        infos.sort(key=lambda info: info.created_at)
        return ListResult(downloads=tuple(infos))

    async def pause(self, params: TaskParams) -> DownloadInfo:
        task_id = params.task_id
        async with self._changing(task_id):
            record = await self._active(task_id, "paused")
            if record.status is not DownloadStatus.PAUSED:
                changes = RecordChanges(status=DownloadStatus.PAUSED)
                record = await self._persistence.update(task_id, changes, if_status=ACTIVE_STATUSES)
                self._bus.publish(lambda seq: DownloadPausedEvent(seq=seq, task_id=task_id))
            # Also when it was paused already: a pause saved but never applied is applied now.
            await self._apply(record, self._session.pause(task_id))
            return await self._info(record)

    async def resume(self, params: TaskParams) -> DownloadInfo:
        task_id = params.task_id
        async with self._changing(task_id):
            record = await self._active(task_id, "resumed")
            if record.status is DownloadStatus.PAUSED:
                changes = RecordChanges(status=DownloadStatus.QUEUED)
                record = await self._persistence.update(
                    task_id, changes, if_status={DownloadStatus.PAUSED}
                )
                self._bus.publish(lambda seq: DownloadResumedEvent(seq=seq, task_id=task_id))
            await self._apply(record, self._session.resume(task_id))
            return await self._info(record)

    async def cancel(self, params: CancelParams) -> EmptyResult:
        task_id = params.task_id
        async with self._changing(task_id):
            await self._forget(self._persistence.remove(task_id), task_id, params.delete_files)
            self._bus.publish(lambda seq: DownloadRemovedEvent(seq=seq, task_id=task_id))
            return EmptyResult()

    async def set_files(self, params: SetFilesParams) -> DownloadInfo:
        task_id = params.task_id
        async with self._changing(task_id):
            record = await self._active(task_id, "changed")
            info = await self._info(record)
            priorities = tuple(params.file_priorities)
            if info.files and len(priorities) != len(info.files):
                raise BadRequest(
                    f"file_priorities has {len(priorities)} entries; "
                    f"the torrent has {len(info.files)} files"
                )
            record = await self._persistence.update(
                task_id, RecordChanges(file_priorities=priorities)
            )
            await self._apply(record, self._session.set_files(task_id, priorities))
            return await self._info(record)

    async def ack(self, params: TaskParams) -> EmptyResult:
        task_id = params.task_id
        async with self._changing(task_id):
            await self._forget(self._persistence.ack(task_id), task_id)
            return EmptyResult()

    async def retry(self, params: TaskParams) -> DownloadInfo:
        """Starts a failed download again from its kept .torrent or magnet: saved `queued`
        with its error cleared, then added to libtorrent without resume data, so the files on
        disk are checked and only what they lack is fetched. `invalid_torrent`, and nothing
        changed, when it has neither a usable .torrent nor a magnet."""
        task_id = params.task_id
        async with self._changing(task_id):
            record = await self._persistence.get(task_id)
            if record.status is not DownloadStatus.FAILED:
                raise BadRequest(
                    f"download {task_id} is {record.status}; only a failed download can be retried"
                )
            layout = self._config.layout
            source = await anyio.to_thread.run_sync(replay_torrent, record, layout)
            if source.data is None and not record.magnet_link:
                why = source.problem or "it has neither a .torrent nor a magnet link"
                raise InvalidTorrent(f"download {task_id} cannot be retried: {why}")
            record = await self._persistence.retry(task_id)
            self._bus.publish(lambda seq: DownloadResumedEvent(seq=seq, task_id=task_id))
            try:
                await self._session.retry(record)
            except NotReady:
                raise  # saved: the next worker's replay adds it, checking its files
            except DlkeeperError as exc:
                # libtorrent refused it (its .torrent went bad since the look above): failed
                # again, with the reason, as a replay that fails.
                failed = await self._persistence.update(
                    task_id,
                    RecordChanges(status=DownloadStatus.FAILED, error=f"cannot be retried: {exc}"),
                    if_status=ACTIVE_STATUSES,
                )
                self._bus.publish(lambda seq: failed_event(failed, seq))
                raise
            return await self._info(record)

    def subscribe(self, params: dict[str, Any]) -> EventFeed:
        """The events for one subscriber, once `open()`ed: every unacknowledged completion and
        failure first, then live events, and progress every `progress_interval` if given."""
        params = dict(params)
        interval = params.pop("progress_interval", None)
        if params:
            raise BadRequest(f"subscribe has no parameter {sorted(params)[0]!r}")
        if interval is not None and (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not MIN_PROGRESS_INTERVAL <= interval <= MAX_PROGRESS_INTERVAL
        ):
            raise BadRequest("progress_interval: a number of seconds from 0.05 to 86400")
        return EventFeed(
            self._bus, self._persistence, self._session, None if interval is None else interval
        )

    async def stats(self, _: NoParams) -> StatsResult:
        free_bytes = await self._free_bytes()
        records = await self._persistence.snapshot()
        session = await self._session.stats()
        counts = Counter(record.status.value for record in records.values())
        return StatsResult(
            downloads=dict(counts),
            resumed_at_start=session.resumed_at_start,
            resume_failures=session.resume_failures,
            worker_restarts=session.worker_restarts,
            uptime=round(time.monotonic() - self._started, 3),
            problems=tuple(self._problems.current()),
            free_bytes=free_bytes,
        )

    # --- free space -----------------------------------------------------------------------------

    async def _free_bytes(self) -> int | None:
        """The free bytes on download_path's file system (None when they cannot be read), and
        the disk-low problem reported or cleared to match."""
        root = self._download_root
        free = await anyio.to_thread.run_sync(_free_bytes_of, root)
        minimum = self._config.min_free_bytes
        if free is None:
            pass  # nothing known: a disk-low problem stays as it was
        elif free < minimum or free == 0:
            self._problems.report(
                DISK_LOW,
                f"the file system of {root} has {free} bytes free, "
                + (f"less than min_free_bytes ({minimum})" if free < minimum else "it is full"),
            )
        else:
            self._problems.clear(DISK_LOW)
        return free

    async def _check_space(
        self,
        record: DownloadRecord,
        files: Sequence[tuple[str, int]],
        promised: contextlib.ExitStack,
    ) -> None:
        """Refuses with `no_space` a download whose wanted bytes not on disk yet, plus what the
        downloads in progress on its file system still need and what was promised to adds not
        in libtorrent yet, do not fit in that file system's free bytes less min_free_bytes.
        Otherwise promises it its bytes, in `promised`, until the caller lets go of them."""
        wanted = _wanted_files(files, record.file_priorities)
        save_path = Path(record.save_path)
        room = await anyio.to_thread.run_sync(_measure_room, save_path, self._download_root, wanted)
        if room is None:
            return  # no free space to go by (download_path missing): libtorrent will say more
        async with self._space.reading() as reading:
            if record.info_hash in reading.info_hashes:
                return  # another download's torrent: persistence answers duplicate
            needed = (
                room.missing
                + reading.needs.get(room.device, 0)
                + self._space.promised_since(reading, room.device)
            )
            minimum = self._config.min_free_bytes
            if needed > room.free - minimum:
                raise NoSpace(
                    f"the download needs {needed} bytes on the file system of {room.folder} "
                    f"(with what the downloads in progress there still need), which has "
                    f"{room.free} bytes free and keeps {minimum} free (min_free_bytes)",
                    needed,
                    room.free,
                )
            # No await since the sum: no other add has passed on the same bytes meanwhile.
            promised.enter_context(self._space.promise(room.device, room.missing))

    async def _read_in_progress(self) -> _InProgress:
        """What the downloads in progress still need, by file system, from libtorrent's
        figures (a download not in libtorrent yet, say a worker restarting, counts nothing)."""
        live = await self._live_all()
        records = await self._persistence.snapshot()
        remaining: list[tuple[Path, int]] = []
        for task_id, status in live.items():
            record = records.get(task_id)
            if record is None or record.status not in NEEDING_STATUSES or status.finished:
                continue
            left = status.total_bytes - status.downloaded_bytes  # of the wanted files
            if left > 0:
                remaining.append((Path(record.save_path), left))
        needs = await anyio.to_thread.run_sync(_needs_by_device, remaining, self._download_root)
        info_hashes = frozenset(r.info_hash for r in records.values() if r.info_hash is not None)
        return _InProgress(needs, info_hashes)

    # --- helpers --------------------------------------------------------------------------------

    async def _source(self, params: AddParams) -> _Source:
        given = [
            name for name in ("magnet", "torrent_b64", "torrent_path") if getattr(params, name)
        ]
        if len(given) != 1:
            raise BadRequest("add needs exactly one of magnet, torrent_b64 and torrent_path")
        if params.magnet is not None:
            info_hash = magnet_info_hash(params.magnet)
            names = parse_qs(urlsplit(params.magnet).query).get("dn", [])
            return _Source(info_hash, None, params.magnet, names[0] if names else info_hash, None)
        # Charged before it is read or decoded, in one piece: a request that held some of the
        # budget and waited for more could wait for another that does the same.
        held = held_bytes()  # the server gives it back once the request is answered
        if params.torrent_b64 is not None:
            await held.take(self._torrent_bytes, len(params.torrent_b64) // 4 * 3)
            try:
                data = base64.b64decode(params.torrent_b64, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("torrent_b64 is not base64") from None
        else:
            assert params.torrent_path is not None
            size = await anyio.to_thread.run_sync(_torrent_path_size, params.torrent_path)
            await held.take(self._torrent_bytes, size)
            data = await anyio.to_thread.run_sync(_read_torrent_path, params.torrent_path)
            if len(data) > size:  # it grew after it was measured: it is in memory all the same
                held.take_nowait(self._torrent_bytes, len(data) - size)
            try:
                return await anyio.to_thread.run_sync(_torrent_source, data)
            except InvalidTorrent:
                # Not the decoder's detail: it would tell a client what any file begins with.
                raise InvalidTorrent(f"{params.torrent_path} is not a .torrent file") from None
        # Decoding a .torrent of many files takes seconds of pure Python: not on the event loop.
        return await anyio.to_thread.run_sync(_torrent_source, data)

    def _torrent_path(self, task_id: str) -> Path:
        return self._config.layout.torrent_path(task_id)

    def _save_path(self, requested: str | None) -> Path:
        root = self._download_root
        if requested is None:
            return root
        path = Path(requested)
        if not path.is_absolute():
            path = root / path
        resolved = path.resolve()  # symlinks too: a link out of download_path is refused
        if resolved != root and root not in resolved.parents:
            raise PathNotAllowed(f"save_path {requested} is not inside {root}")
        for folder in self._own_folders:
            if _within(resolved, folder):
                raise PathNotAllowed(
                    f"save_path {requested} is inside {folder}, where dlkeeper keeps its own files"
                )
        return resolved

    def _refuse_own_folders(self, save_path: Path, files: Iterable[tuple[str, int]]) -> None:
        """Refuses a torrent a file of which would land in one of dlkeeper's own folders (a
        multi-file torrent named `torrents` saved at download_path would write among the
        .torrent and .fastresume copies). The paths are libtorrent's, with no `..` and no
        leading `/`: only a top element that is a symlink leads elsewhere, so each top is
        resolved once and the rest of a path is compared as text."""
        tops: dict[str, str] = {}
        own = [str(folder) for folder in self._own_folders]
        for path, _ in files:
            top, _, rest = path.partition("/")
            landing = tops.get(top)
            if landing is None:
                landing = tops[top] = str((save_path / top).resolve())
            written = f"{landing}/{rest}" if rest else landing
            for folder in own:
                if written == folder or written.startswith(folder + "/"):
                    raise PathNotAllowed(
                        f"the torrent's file {path} would be written in {folder}, "
                        "where dlkeeper keeps its own files"
                    )

    @contextlib.asynccontextmanager
    async def _changing(self, task_id: str) -> AsyncIterator[None]:
        """Runs one change of a download: after every change of it that arrived before, so
        libtorrent gets them in the order they were saved; to its end even if the client goes
        away (a change saved and not applied would leave the state file and libtorrent apart)."""
        with anyio.CancelScope(shield=True):
            async with self._changes.hold(task_id):
                yield

    async def _start(self, record: DownloadRecord, torrent: bytes | None) -> None:
        try:
            await self._session.add(record, fresh=True, torrent=torrent)
        except NotReady:
            raise  # saved: the next worker gets it (a retried add answers once it has)
        except DlkeeperError:
            # libtorrent refused what our own checks let through: undo the add.
            with contextlib.suppress(NotFound):
                await self._persistence.remove(record.task_id)
            raise

    async def _forget(
        self, saved: Awaitable[object], task_id: str, delete_files: bool = False
    ) -> None:
        """Takes a download out of the state file (`saved`: the remove or ack), then out of
        libtorrent. Also when the state file no longer has it (`not_found`, raised after): a
        cancel or ack saved before whose removal from libtorrent never happened is done now."""
        try:
            await saved
        except NotFound:
            await self._session.remove(task_id, delete_files=delete_files)
            raise
        await self._session.remove(task_id, delete_files=delete_files)

    async def _apply(self, record: DownloadRecord, change: Awaitable[None]) -> None:
        """Applies a saved change to libtorrent. A download libtorrent does not have (its add
        was saved and never applied) is added as saved, which applies the change too. When
        the worker is restarting this raises `NotReady`: the session applies the saved state
        once the next worker is up, and the request may be retried."""
        try:
            await change
        except NotFound:
            await self._session.add(record)

    async def _active(self, task_id: str, verb: str) -> DownloadRecord:
        record = await self._persistence.get(task_id)
        if record.status not in ACTIVE_STATUSES:
            raise BadRequest(f"download {task_id} is {record.status}; it cannot be {verb}")
        return record

    async def _info(self, record: DownloadRecord) -> DownloadInfo:
        live: TorrentStatus | None = None
        if record.status in ACTIVE_STATUSES:
            try:
                (live,) = await self._session.status(record.task_id)
            except (NotReady, NotFound):
                live = None
        return download_info(record, live)

    async def _live_all(self) -> dict[str, TorrentStatus]:
        try:
            return {status.task_id: status for status in await self._session.status()}
        except NotReady:
            return {}


class EventFeed:
    """One subscriber's events as JSON-ready data, for `run(send)` to hand out in order."""

    def __init__(
        self,
        bus: EventBus,
        persistence: Persistence,
        session: Session,
        progress_interval: float | None,
    ) -> None:
        self._bus = bus
        self._persistence = persistence
        self._session = session
        self._interval = progress_interval
        self._subscription: Subscription | None = None

    @property
    def overflowed(self) -> bool:
        """The subscriber fell behind and its events were cut off: its connection should go."""
        return self._subscription is not None and self._subscription.overflowed

    def open(self) -> None:
        """Starts collecting live events (before the subscriber is told `ok`: none is missed)."""
        self._subscription = self._bus.subscribe()

    def close(self) -> None:
        if self._subscription is not None:
            self._bus.unsubscribe(self._subscription)

    async def run(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Sends the backlog, then live events (and progress) until the subscription ends."""
        assert self._subscription is not None, "open() the feed first"
        async with anyio.create_task_group() as tasks:
            if self._interval is not None:
                tasks.start_soon(self._send_progress, send, float(self._interval))
            await self._send_events(send, self._subscription)
            tasks.cancel_scope.cancel()

    async def _send_events(
        self, send: Callable[[dict[str, Any]], Awaitable[None]], subscription: Subscription
    ) -> None:
        # Every unacknowledged completion and failure first, then live events.
        backlog: set[str] = set()
        records = await self._persistence.snapshot()
        for record in sorted(records.values(), key=lambda r: r.created_at):
            if record.status is DownloadStatus.COMPLETED:
                await send(_event(completed_event(record, self._bus.next_seq())))
            elif record.status is DownloadStatus.FAILED:
                await send(_event(failed_event(record, self._bus.next_seq())))
            else:
                continue
            backlog.add(record.task_id)
        async for event in subscription.events:
            if isinstance(event, DownloadResumedEvent):
                # A retry: the failure sent from the state file is over, and the download's
                # completion or next failure is news.
                backlog.discard(event.task_id)
            if (
                isinstance(event, DownloadCompletedEvent | DownloadFailedEvent)
                and event.task_id in backlog
            ):
                continue  # sent already, from the state file
            await send(_event(event))

    async def _send_progress(
        self, send: Callable[[dict[str, Any]], Awaitable[None]], interval: float
    ) -> None:
        while True:
            await anyio.sleep(interval)
            with contextlib.suppress(DlkeeperError):
                for status in await self._session.status():
                    if status.finished or status.paused:
                        continue
                    event = DownloadProgressEvent(
                        seq=self._bus.next_seq(),
                        task_id=status.task_id,
                        progress=status.progress,
                        download_rate=status.download_rate,
                        num_peers=status.num_peers,
                    )
                    await send(_event(event))


def _event(event: Message) -> dict[str, Any]:
    return event.model_dump(mode="json")


@dataclass(frozen=True, slots=True)
class _Source:
    """What an add downloads: its info hash, and its .torrent or its magnet."""

    info_hash: str
    torrent: bytes | None
    magnet: str | None
    name: str
    files: list[tuple[str, int]] | None  # None until a magnet's metadata is known


@dataclass(frozen=True, slots=True)
class _InProgress:
    """A reading of the downloads in progress: the bytes they still need by file system
    (`st_dev`), and the info hashes the state file holds."""

    needs: dict[int, int]
    info_hashes: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Reading:
    mark: int  # on the ledger's clock, taken before the reading began
    needs: dict[int, int]
    info_hashes: frozenset[str]


@dataclass(slots=True)
class _Promise:
    device: int
    size: int
    given_back: int | None = None  # on the ledger's clock


class _SpaceLedger:
    """What an add's space check counts besides the add itself: the bytes the downloads in
    progress still need, and the bytes promised to adds that passed their check.

    Each check uses a reading begun after it asked, so it sees every change answered before;
    the checks that ask while a reading is under way share the next one, so a burst of adds
    costs a few status reads of every download, not one each.

    A promise is given back once libtorrent has the download, whose figures a reading shows
    from then on. A reading that began before a promise was given back may not show its
    download, so a check using it still counts the promise: a download may be counted twice,
    never not at all, and two adds cannot both pass on the same free bytes."""

    def __init__(self, read: Callable[[], Awaitable[_InProgress]]) -> None:
        self._read = read
        self._clock = itertools.count()  # orders readings and given-back promises
        self._latest: _Reading | None = None
        self._reading_done: anyio.Event | None = None  # one reading at a time
        self._promises: dict[int, _Promise] = {}
        self._in_use: Counter[int] = Counter()  # the marks of the readings checks are using

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[_Reading]:
        """A reading begun after this call, for one check (with `promised_since`)."""
        reading = await self._fresh_reading()
        self._in_use[reading.mark] += 1
        try:
            yield reading
        finally:
            self._in_use[reading.mark] -= 1
            if not self._in_use[reading.mark]:
                del self._in_use[reading.mark]
            self._prune()

    def promised_since(self, reading: _Reading, device: int) -> int:
        """The bytes promised on `device` that `reading` may not show."""
        return sum(
            promise.size
            for promise in self._promises.values()
            if promise.device == device
            and (promise.given_back is None or promise.given_back > reading.mark)
        )

    @contextlib.contextmanager
    def promise(self, device: int, size: int) -> Iterator[None]:
        """`size` bytes promised on `device` until the block ends."""
        promise = self._promises[next(self._clock)] = _Promise(device, size)
        try:
            yield
        finally:
            promise.given_back = next(self._clock)
            self._prune()

    async def _fresh_reading(self) -> _Reading:
        asked = next(self._clock)
        while True:
            latest = self._latest
            if latest is not None and latest.mark > asked:
                return latest
            if self._reading_done is not None:
                # Begun before we asked, or one we may share: then look again.
                await self._reading_done.wait()
                continue
            done = self._reading_done = anyio.Event()
            try:
                mark = next(self._clock)
                value = await self._read()
                reading = _Reading(mark, value.needs, value.info_hashes)
                self._latest = reading
                self._prune()
                return reading
            finally:
                self._reading_done = None
                done.set()

    def _prune(self) -> None:
        """Forgets the given-back promises that no reading in use, nor the latest, may miss."""
        marks = list(self._in_use)
        if self._latest is not None:
            marks.append(self._latest.mark)
        oldest = min(marks, default=None)
        for key, promise in list(self._promises.items()):
            if promise.given_back is not None and (oldest is None or promise.given_back < oldest):
                del self._promises[key]


@dataclass(frozen=True, slots=True)
class _Room:
    """The file system an add writes to, and what the add needs of it."""

    folder: Path  # the nearest folder of the save path that exists
    device: int
    free: int
    missing: int  # the wanted bytes not on disk yet


def _wanted_files(
    files: Sequence[tuple[str, int]], priorities: Sequence[int]
) -> list[tuple[str, int]]:
    """The files a download wants: those of priority > 0, or all when no priorities are given."""
    if not priorities:
        return list(files)
    return [file for file, priority in zip(files, priorities, strict=True) if priority > 0]


def _existing_folder(path: Path, root: Path) -> Path | None:
    """`path`, or its nearest parent that exists, no higher than `root` (None when `root` is
    missing: a drive not mounted, whose mount point's file system says nothing)."""
    while not path.is_dir():
        if path in (root, path.parent):
            return None
        path = path.parent
    return path


def _free_bytes_of(path: Path) -> int | None:
    """The bytes an unprivileged process may still write on `path`'s file system."""
    try:
        found = os.statvfs(path)
    except OSError:
        return None
    return found.f_bavail * found.f_frsize


def _measure_room(save_path: Path, root: Path, files: Sequence[tuple[str, int]]) -> _Room | None:
    """The room of an add of `files` (paths under `save_path`, sizes), or None when the free
    space cannot be read. A file's bytes on disk are its allocated blocks, at most its size: a
    complete file from an earlier download counts as there, the holes of a sparse one do not."""
    folder = _existing_folder(save_path, root)
    if folder is None:
        return None
    free = _free_bytes_of(folder)
    try:
        device = folder.stat().st_dev
    except OSError:
        return None
    if free is None:
        return None
    missing = 0
    for path, size in files:
        try:
            found = (save_path / path).stat()
        except OSError:  # not there (or not reachable): all of it is missing
            missing += size
            continue
        present = min(size, found.st_blocks * 512) if stat.S_ISREG(found.st_mode) else 0
        missing += size - present
    return _Room(folder, device, free, missing)


def _needs_by_device(remaining: Iterable[tuple[Path, int]], root: Path) -> dict[int, int]:
    """The `remaining` bytes (by save path) summed by file system; one stat per save path."""
    devices: dict[Path, int | None] = {}
    needs: dict[int, int] = {}
    for save_path, left in remaining:
        if save_path not in devices:
            folder = _existing_folder(save_path, root)
            try:
                devices[save_path] = None if folder is None else folder.stat().st_dev
            except OSError:
                devices[save_path] = None
        device = devices[save_path]
        if device is not None:
            needs[device] = needs.get(device, 0) + left
    return needs


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _torrent_path_size(name: str) -> int:
    """The bytes reading `torrent_path` will take (0 for what is no regular file, which the
    read refuses), measured before it is read; raises the errors the read would."""
    path = _absolute_torrent_path(name)
    with _torrent_path_errors(name):
        found = path.stat()
    if not stat.S_ISREG(found.st_mode):
        return 0
    if found.st_size > MAX_TORRENT_BYTES:  # refused without reading it
        raise InvalidTorrent(f"{path} is larger than {MAX_TORRENT_BYTES} bytes")
    return found.st_size


def _read_torrent_path(name: str) -> bytes:
    path = _absolute_torrent_path(name)
    with _torrent_path_errors(name):
        return read_small_file(path, MAX_TORRENT_BYTES)


def _absolute_torrent_path(name: str) -> Path:
    path = Path(name)
    if not path.is_absolute():
        raise BadRequest(f"torrent_path {name} is not an absolute path")
    return path


@contextlib.contextmanager
def _torrent_path_errors(name: str) -> Iterator[None]:
    """A `torrent_path` that cannot be used, as the contract's errors."""
    try:
        yield
    except FileNotFoundError:
        raise BadRequest(f"torrent_path {name} does not exist") from None
    except OSError as exc:
        raise BadRequest(f"torrent_path {name} cannot be read: {exc.strerror}") from None
    except DlkeeperError as exc:
        raise InvalidTorrent(str(exc)) from None


def _torrent_source(data: bytes) -> _Source:
    torrent = read_torrent(data)  # one decoding: it takes seconds for a torrent of many files
    return _Source(torrent.info_hash, data, None, torrent.name or torrent.info_hash, torrent.files)


def _keep_torrent(path: Path, data: bytes) -> None:
    path.parent.mkdir(exist_ok=True)  # torrents/; download_path itself: never (CONTRACT.md 3)
    write_file_atomically(path, data)
