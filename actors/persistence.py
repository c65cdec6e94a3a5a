"""The persistence actor: the only writer of `downloads.json`.

It holds the library's state lock from start to stop, loads (and repairs or migrates) the file at
start, and commits mutations in groups: a mutation is applied in memory at once, and the next
write takes every mutation that arrived while the previous write was under way. Each caller's
reply is sent only after the fsync that contains its change, so 1,000 concurrent mutations cost
a few writes, not 1,000. Reads are answered from the last saved state at once, whatever a write
is doing.

A write that fails, at any step, fails its callers, and leaves the disk in doubt: the rename may
have happened before the folder's fsync failed, and after an fsync error the page cache is not
to be trusted. So the committed state (what reads answer from) is then written again, whole, to
a new file, retried with backoff until a write succeeds; until then `problems` lists it. The
first rewrite is tried at once, and changes that arrive meanwhile wait for it; once it has
failed too, changes are refused at once (`StateWriteFailed`) until one succeeds, so a caller
never waits on a disk that is full for long, and nothing is answered ok before it is on disk.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.errors import (
    BadRequest,
    DlkeeperError,
    Duplicate,
    NotFound,
    StaleChange,
    StateWriteFailed,
)
from actors.mailbox import Actor, ActorRef, Envelope, Reply, expect
from actors.messages.base import Message
from actors.messages.persistence import (
    AckRecord,
    AddRecord,
    AddRecordReply,
    GetPersistenceStats,
    GetRecord,
    GetSnapshot,
    PersistenceCommand,
    PersistenceStatsReply,
    RecordChanges,
    RecordReply,
    RemoveRecord,
    RetryRecord,
    SnapshotReply,
    StateMutation,
    UpdateRecord,
)
from actors.problems import Problems
from actors.state import FINISHED_STATUSES, DownloadRecord, DownloadStatus, storing_problem
from actors.statefile import LoadReport, StateStore

log = logging.getLogger(__name__)

_MAX_SETTLE_TURNS = 64
_QUIET_TURNS = 2
STATE_WRITE_PROBLEM = "state-write"
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 30.0


def retry_delays(
    first: float = RETRY_FIRST_DELAY, most: float = RETRY_MAX_DELAY
) -> Iterator[float]:
    """Seconds to wait before each retry of a write the disk refused: doubling, then capped."""
    for exponent in itertools.count():
        delay = first * 2**exponent
        if delay >= most:
            break
        yield delay
    yield from itertools.repeat(most)


class HashIndex:
    """Which downloads hold each info hash, so an add's duplicate check is not a scan."""

    def __init__(self, downloads: Mapping[str, DownloadRecord]) -> None:
        self._owners: dict[str, set[str]] = {}
        for record in downloads.values():
            self.add(record)

    def add(self, record: DownloadRecord) -> None:
        if record.info_hash is not None:
            self._owners.setdefault(record.info_hash, set()).add(record.task_id)

    def discard(self, record: DownloadRecord) -> None:
        if record.info_hash is None:
            return
        owners = self._owners.get(record.info_hash)
        if owners is not None:
            owners.discard(record.task_id)
            if not owners:
                del self._owners[record.info_hash]

    def owner(self, info_hash: str | None) -> str | None:
        """A download holding `info_hash` (the first by task_id when a hand-edited file has
        several), or None."""
        owners = self._owners.get(info_hash) if info_hash is not None else None
        return min(owners) if owners else None


@dataclass(frozen=True)
class Applied:
    """What a mutation did: the record it concerns, and whether that was there already (an
    add that found its own download, so nothing changed)."""

    record: DownloadRecord
    existed: bool = False


def apply_mutation(
    downloads: dict[str, DownloadRecord],
    mutation: StateMutation,
    index: HashIndex | None = None,
) -> Applied:
    """Applies `mutation` to `downloads` in place (and to `index`, which must describe
    `downloads`; made here when not given).

    Raises a `DlkeeperError` (and changes nothing) when the mutation is not allowed, and
    `BadRequest` for a record the state file cannot hold: refused here, it fails its own
    caller instead of the write that would carry it.
    """
    index = index if index is not None else HashIndex(downloads)
    if isinstance(mutation, AddRecord):
        record = mutation.record
        current = downloads.get(record.task_id)
        if current is not None:
            if current.info_hash == record.info_hash:
                return Applied(current, existed=True)
            raise Duplicate(
                f"task_id {record.task_id} is already the torrent {current.info_hash}",
                record.task_id,
            )
        owner = index.owner(record.info_hash)
        if owner is not None:
            raise Duplicate(
                f"the torrent {record.info_hash} is already the download {owner}", owner
            )
        _require_storable(record)
        downloads[record.task_id] = record
        index.add(record)
        return Applied(record)
    current = downloads.get(mutation.task_id)
    if current is None:
        raise NotFound(mutation.task_id)
    if isinstance(mutation, UpdateRecord):
        if mutation.if_status is not None and current.status not in mutation.if_status:
            raise StaleChange(current.task_id, current.status)
        updated = current.model_copy(update=mutation.changes.changed())
        _require_storable(updated)
        downloads[mutation.task_id] = updated
        index.discard(current)
        index.add(updated)
        return Applied(updated)
    if isinstance(mutation, RetryRecord):
        if current.status is not DownloadStatus.FAILED:
            raise BadRequest(
                f"download {current.task_id} is {current.status}; "
                "only a failed download can be retried"
            )
        retried = current.model_copy(
            update={"status": DownloadStatus.QUEUED, "error": None, "completed_at": None}
        )
        downloads[mutation.task_id] = retried
        return Applied(retried)
    if isinstance(mutation, AckRecord) and current.status not in FINISHED_STATUSES:
        raise BadRequest(
            f"download {current.task_id} is {current.status}; "
            "only completed or failed downloads can be acknowledged"
        )
    del downloads[mutation.task_id]
    index.discard(current)
    return Applied(current)


def _require_storable(record: DownloadRecord) -> None:
    problem = storing_problem(record)
    if problem is not None:
        raise BadRequest(problem)


@dataclass
class _Pending:
    mutation: StateMutation
    reply: Reply
    applied: Applied

    def answer(self) -> Message:
        if isinstance(self.mutation, AddRecord):
            return AddRecordReply(record=self.applied.record, existed=self.applied.existed)
        return RecordReply(record=self.applied.record)


class PersistenceActor(Actor[PersistenceCommand]):
    """Owns `downloads.json`; see the module docstring."""

    name = "persistence"

    def __init__(self, store: StateStore, problems: Problems | None = None) -> None:
        self._store = store
        self._problems = problems or Problems()
        self._committed: dict[str, DownloadRecord] = {}
        self._working: dict[str, DownloadRecord] = {}
        self._index = HashIndex({})
        self._queued: list[_Pending] = []
        self._wake = anyio.Event()
        self._inbox_closed = False
        self._load_report: LoadReport | None = None
        self._writes = 0
        self._committed_mutations = 0
        # After a failed write: the disk must get the committed state again before anything else.
        self._rewrite_needed = False
        # While a rewrite keeps failing: changes are refused at once instead of waiting for it.
        self._refusing: StateWriteFailed | None = None
        self._rewrite_delays = retry_delays()

    async def on_start(self) -> None:
        await anyio.to_thread.run_sync(self._store.acquire_lock)
        try:
            downloads, self._load_report = await anyio.to_thread.run_sync(self._store.load)
        except BaseException:
            await anyio.to_thread.run_sync(self._store.release_lock)
            raise
        self._committed = downloads
        self._working = dict(downloads)
        self._index = HashIndex(downloads)

    async def on_stop(self) -> None:
        await anyio.to_thread.run_sync(self._store.release_lock)

    async def run(self, inbox: MemoryObjectReceiveStream[Envelope[PersistenceCommand]]) -> None:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._write_loop)
            async for envelope in inbox:
                self._handle(envelope.message, envelope.asked())
                # Take everything already waiting in one turn, so that it joins the next write.
                for waiting in _ready(inbox):
                    self._handle(waiting.message, waiting.asked())
            self._inbox_closed = True
            self._wake.set()  # the write loop saves what is queued, then returns

    def _handle(self, command: PersistenceCommand, reply: Reply) -> None:
        if isinstance(command, GetSnapshot | GetRecord | GetPersistenceStats):
            self._answer_read(command, reply)
            return
        if self._refusing is not None:
            reply.fail(self._refusing)
            return
        try:
            applied = apply_mutation(self._working, command, self._index)
        except DlkeeperError as error:
            reply.fail(error)
            return
        pending = _Pending(command, reply, applied)
        if (
            applied.existed
            and not self._rewrite_needed  # else the disk may not hold what memory does
            and self._committed.get(applied.record.task_id) is applied.record
        ):
            reply.send(pending.answer())  # already on disk: nothing to wait for
            return
        self._queued.append(pending)
        self._wake.set()

    def _answer_read(
        self, command: GetSnapshot | GetRecord | GetPersistenceStats, reply: Reply
    ) -> None:
        if isinstance(command, GetSnapshot):
            # Not validated again (1,000 records took 0.12 ms a snapshot): they were when made,
            # and the committed dict is never changed after its write, only replaced.
            reply.send(SnapshotReply.model_construct(downloads=self._committed))
        elif isinstance(command, GetRecord):
            record = self._committed.get(command.task_id)
            if record is None:
                reply.fail(NotFound(command.task_id))
            else:
                reply.send(RecordReply(record=record))
        else:
            report = self._load_report
            assert report is not None, "on_start() loads before any message is handled"
            reply.send(
                PersistenceStatsReply(
                    load_source=str(report.source),
                    migrated_from=report.migrated_from,
                    quarantined=tuple(str(path) for path in report.quarantined),
                    load_problems=report.problems,
                    writes=self._writes,
                    committed_mutations=self._committed_mutations,
                )
            )

    async def _write_loop(self) -> None:
        while True:
            if self._rewrite_needed:
                await self._rewrite_committed()
                continue
            if not self._queued:
                if self._inbox_closed:
                    return
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self._let_answered_callers_queue()
            batch, self._queued = self._queued, []
            snapshot = dict(self._working)
            try:
                # Not abandoned on cancellation: a write in progress always runs to its end.
                await anyio.to_thread.run_sync(self._store.write, snapshot)
            except Exception as exc:  # whatever failed the write fails its batch, not the actor
                self._write_failed(batch, exc)
                continue
            self._committed = snapshot
            self._wrote()
            self._committed_mutations += len(batch)
            for pending in batch:
                pending.reply.send(pending.answer())

    def _wrote(self) -> None:
        self._writes += 1
        self._problems.clear(STATE_WRITE_PROBLEM)

    async def _let_answered_callers_queue(self) -> None:
        # Callers answered by the previous write need a few scheduler turns to send their next
        # change. Starting the next write at once would leave them for the write after, and
        # steady callers would split into two alternating half-size groups. So wait while the
        # queue still grows, a bounded number of turns (a constant stream cannot stall writes).
        quiet_turns = 0
        for _ in range(_MAX_SETTLE_TURNS):
            queued = len(self._queued)
            await anyio.lowlevel.checkpoint()
            quiet_turns = quiet_turns + 1 if len(self._queued) == queued else 0
            if quiet_turns >= _QUIET_TURNS:
                return

    def _write_failed(self, batch: list[_Pending], exc: Exception) -> None:
        error = StateWriteFailed(f"could not save the download state: {exc}")
        # A disk's refusal is said in a line; anything else is a bug: its traceback too.
        unexpected = not isinstance(exc, OSError)
        log.error("persistence: %s; %d changes refused", error, len(batch), exc_info=unexpected)
        self._report(exc)
        for pending in batch:
            pending.reply.fail(error)
        # Back to what was committed, then redo the mutations that arrived during the failed
        # write: they wait for the rewrite, and are written after it.
        self._rewrite_needed = True
        self._reset_working()

    async def _rewrite_committed(self) -> None:
        """One attempt to make the disk hold the committed state again; on failure, refuses
        what waits and sleeps the next backoff delay (cut short by a stop)."""
        committed = self._committed
        write = functools.partial(self._store.write, committed, keep_backup=False)
        try:
            await anyio.to_thread.run_sync(write)
        except Exception as exc:
            self._refusing = StateWriteFailed(
                f"the download state cannot be saved now (the last write failed: {exc}); "
                "changes are refused until a write succeeds"
            )
            self._report(exc)
            refused, self._queued = self._queued, []
            for pending in refused:
                pending.reply.fail(self._refusing)
            self._reset_working()
            if self._inbox_closed:
                log.error(
                    "persistence: stopping with the state file not rewritten (%s); it holds "
                    "the last saved state or the refused changes, both complete",
                    exc,
                )
                self._rewrite_needed = False
                return
            self._wake = anyio.Event()  # set by the inbox closing
            with anyio.move_on_after(next(self._rewrite_delays)):
                await self._wake.wait()
            return
        self._rewrite_needed = False
        self._refusing = None
        self._rewrite_delays = retry_delays()
        log.info("persistence: the state file holds the saved state again")
        self._wrote()

    def _report(self, exc: Exception) -> None:
        self._problems.report(
            STATE_WRITE_PROBLEM,
            f"the state file {self._store.path} cannot be written ({exc}); "
            "changes are refused and the write is retried",
        )

    def _reset_working(self) -> None:
        self._working = dict(self._committed)
        self._index = HashIndex(self._working)
        later, self._queued = self._queued, []
        for pending in later:
            self._handle(pending.mutation, pending.reply)


def _ready(
    inbox: MemoryObjectReceiveStream[Envelope[PersistenceCommand]],
) -> list[Envelope[PersistenceCommand]]:
    ready: list[Envelope[PersistenceCommand]] = []
    while True:
        try:
            ready.append(inbox.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return ready


class Persistence:
    """A typed handle on the persistence actor, for the other actors and the API."""

    def __init__(self, ref: ActorRef[PersistenceCommand], timeout: float = 30.0) -> None:
        self.ref = ref
        self._timeout = timeout

    async def add(self, record: DownloadRecord) -> AddRecordReply:
        """Saves a new download; returns once it is on disk. A download already saved under
        this task_id with the same info hash is returned as it is (`existed`); see `AddRecord`
        for the `Duplicate` refusals."""
        reply = await self.ref.ask(AddRecord(record=record), timeout=self._timeout)
        return expect(reply, AddRecordReply)

    async def update(
        self,
        task_id: str,
        changes: RecordChanges,
        *,
        if_status: Collection[DownloadStatus] | None = None,
    ) -> DownloadRecord:
        """Changes fields of a download; returns the saved record once it is on disk.

        With `if_status`, only while the download's status is one of those (a check and a
        change in one step: nothing else can change it between the two); else `StaleChange`.
        """
        condition = frozenset(if_status) if if_status is not None else None
        command = UpdateRecord(task_id=task_id, changes=changes, if_status=condition)
        return await self._record(command)

    async def remove(self, task_id: str) -> DownloadRecord:
        """Forgets a download; returns the record it was, once that is on disk."""
        return await self._record(RemoveRecord(task_id=task_id))

    async def ack(self, task_id: str) -> DownloadRecord:
        """Forgets a completed or failed download; returns it once that is on disk."""
        return await self._record(AckRecord(task_id=task_id))

    async def retry(self, task_id: str) -> DownloadRecord:
        """Makes a failed download `queued` again, its error cleared; returns it once that is
        on disk. `BadRequest` when it is not failed."""
        return await self._record(RetryRecord(task_id=task_id))

    async def get(self, task_id: str) -> DownloadRecord:
        return await self._record(GetRecord(task_id=task_id))

    async def snapshot(self) -> dict[str, DownloadRecord]:
        reply = await self.ref.ask(GetSnapshot(), timeout=self._timeout)
        return expect(reply, SnapshotReply).downloads

    async def stats(self) -> PersistenceStatsReply:
        reply = await self.ref.ask(GetPersistenceStats(), timeout=self._timeout)
        return expect(reply, PersistenceStatsReply)

    async def _record(self, command: PersistenceCommand) -> DownloadRecord:
        reply = await self.ref.ask(command, timeout=self._timeout)
        return expect(reply, RecordReply).record
