"""The monitor actor: turns what the session reports into durable state, then tells the bot.

It consumes the session actor's events, in order, and records each in the state file before
anything else may act on it: a finished download becomes `completed` with `completed_at`, a
download that errored (or could not be replayed) becomes `failed` with the reason, and a
magnet's kept `.torrent` is recorded so that no later resume depends on peers for metadata.
The daemon starts it only after the replay, so completions that libtorrent reported while the
saved downloads were being replayed are handled then, neither lost nor early.

A record the state file refuses (a full or failing disk) is not dropped: a completion, a
failure, a kept `.torrent` or a start is retried with backoff until it is on disk, and only then
published, while `problems` says so. The events of other downloads go on meanwhile; the later
events of that download wait behind it, so none overtakes. A progress record is not retried:
the next resume save brings a newer one.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.bus import EventBus
from actors.downloads import completed_event, failed_event
from actors.errors import AskTimeout, DlkeeperError, NotFound, StaleChange, StateWriteFailed
from actors.mailbox import Actor, Envelope
from actors.messages.persistence import RecordChanges
from actors.messages.session import (
    DownloadErrored,
    DownloadFinished,
    DownloadMetadataKept,
    DownloadProgressKept,
    DownloadStateChanged,
    SessionEvent,
    WorkerRestarted,
)
from actors.persistence import Persistence, retry_delays
from actors.problems import Problems
from actors.state import ACTIVE_STATUSES, DownloadStatus

log = logging.getLogger(__name__)

# What each kind of record is, for `problems`; the kinds not here are not retried.
_RETRIED = {
    DownloadFinished: "completion",
    DownloadErrored: "failure",
    DownloadMetadataKept: "kept .torrent",
    DownloadStateChanged: "start",
}


@dataclass
class _Waiting:
    """An event waiting for its record; `in_doubt` once an attempt timed out, which the
    persistence actor may still have carried out."""

    event: SessionEvent
    in_doubt: bool = False


class MonitorActor(Actor[None]):
    """Records the session's events durably; see the module docstring."""

    name = "monitor"

    def __init__(
        self,
        persistence: Persistence,
        events: MemoryObjectReceiveStream[SessionEvent],
        bus: EventBus | None = None,
        problems: Problems | None = None,
    ) -> None:
        self._persistence = persistence
        self._problems = problems or Problems()
        self._events = events
        self._bus = bus
        # Per download: the events behind a record the disk refused, oldest (the refused) first.
        self._backlogs: dict[str, deque[_Waiting]] = {}

    async def run(self, inbox: MemoryObjectReceiveStream[Envelope[None]]) -> None:
        # The work comes from the event stream; the inbox closing is the signal to stop.
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._consume, task_group)
            async for _ in inbox:
                pass
            task_group.cancel_scope.cancel()  # an event being recorded is recorded first
        # What the session reported before the stop is recorded too, in order: the progress
        # of the resume data saved on stop, say. Then one last try for what the disk refused.
        while True:
            try:
                event = self._events.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            await self._take(event, None)
        for task_id in list(self._backlogs):
            if not await self._work_off(task_id):
                log.error(
                    "stopping with the %s of download %s not saved: the state file refuses it; "
                    "libtorrent reports it again after the restart",
                    _what(self._backlogs[task_id][0].event),
                    task_id,
                )

    async def _consume(self, task_group: TaskGroup) -> None:
        async for event in self._events:
            with anyio.CancelScope(shield=True):
                await self._take(event, task_group)

    async def _take(self, event: SessionEvent, retries: TaskGroup | None) -> None:
        """Records `event`, or queues it behind its download's refused record; a refused
        record starts that download's retries in `retries`."""
        task_id = getattr(event, "task_id", None)
        if task_id is None:
            await self._handle(_Waiting(event))
            return
        backlog = self._backlogs.get(task_id)
        if backlog is not None:
            backlog.append(_Waiting(event))
            return
        waiting = _Waiting(event)
        error = await self._handle(waiting)
        if error is not None:
            self._backlogs[task_id] = deque([waiting])
            if retries is not None:
                retries.start_soon(self._retry, task_id, error)

    async def _retry(self, task_id: str, error: DlkeeperError) -> None:
        problem = f"record:{task_id}"
        for delay in retry_delays():
            what = _what(self._backlogs[task_id][0].event)
            self._problems.report(
                problem,
                f"the {what} of download {task_id} is not saved yet ({error}); "
                f"retrying every {delay:g} s",
            )
            await anyio.sleep(delay)
            with anyio.CancelScope(shield=True):
                if await self._work_off(task_id):
                    break
        self._problems.clear(problem)

    async def _work_off(self, task_id: str) -> bool:
        """Records the backlog of `task_id` in order; False when its oldest is refused again."""
        backlog = self._backlogs[task_id]
        while backlog:
            if await self._handle(backlog[0]) is not None:
                return False
            backlog.popleft()
        del self._backlogs[task_id]
        return True

    async def _handle(self, waiting: _Waiting) -> DlkeeperError | None:
        """Records the event; returns the error when the state file refused a record that
        must be retried."""
        event = waiting.event
        try:
            await self._record(event, waiting.in_doubt)
        except NotFound:
            log.info("%s for a download no longer kept; ignored", event.kind)
        except (StateWriteFailed, AskTimeout) as exc:
            if type(event) in _RETRIED:
                waiting.in_doubt = waiting.in_doubt or isinstance(exc, AskTimeout)
                return exc
            log.info("could not record %s (the next one will be): %s", event.kind, exc)
        except DlkeeperError as exc:
            log.error("could not record %s: %s", event.kind, exc)
        return None

    async def _record(self, event: SessionEvent, in_doubt: bool = False) -> None:
        """`in_doubt`: an earlier attempt at this event timed out, and may have been saved
        without being published."""
        if isinstance(event, DownloadFinished):
            record = await self._persistence.get(event.task_id)
            if in_doubt and record.status is DownloadStatus.COMPLETED:
                if self._bus is not None:
                    self._bus.publish(lambda seq: completed_event(record, seq))
            elif record.status in ACTIVE_STATUSES:
                record = await self._persistence.update(
                    event.task_id,
                    RecordChanges(
                        status=DownloadStatus.COMPLETED,
                        progress=1.0,
                        completed_at=datetime.now(UTC),
                        error=None,
                    ),
                    if_status=ACTIVE_STATUSES,  # no gap for a cancel or ack to fall in
                )
                log.info("download %s completed", event.task_id)
                if self._bus is not None:  # on disk first, published second
                    self._bus.publish(lambda seq: completed_event(record, seq))
        elif isinstance(event, DownloadErrored):
            record = await self._persistence.get(event.task_id)
            if in_doubt and record.status is DownloadStatus.FAILED and record.error == event.error:
                if self._bus is not None:
                    self._bus.publish(lambda seq: failed_event(record, seq))
            elif record.status in ACTIVE_STATUSES:  # a completed download stays completed
                record = await self._persistence.update(
                    event.task_id,
                    RecordChanges(status=DownloadStatus.FAILED, error=event.error),
                    if_status=ACTIVE_STATUSES,
                )
                log.warning("download %s failed: %s", event.task_id, event.error)
                if self._bus is not None:
                    self._bus.publish(lambda seq: failed_event(record, seq))
        elif isinstance(event, DownloadMetadataKept):
            record = await self._persistence.get(event.task_id)
            changes = RecordChanges(torrent_file_path=event.torrent_path)
            # A magnet without `dn` was named after its info hash until its metadata came.
            if event.name and record.name in ("", record.info_hash):
                changes = RecordChanges(torrent_file_path=event.torrent_path, name=event.name)
            await self._persistence.update(event.task_id, changes)
        elif isinstance(event, DownloadProgressKept):
            # Saved with the resume data, so that `list` after a restart shows it at once.
            record = await self._persistence.get(event.task_id)
            if record.status in ACTIVE_STATUSES and record.progress != event.progress:
                progress = min(max(event.progress, 0.0), 1.0)
                await self._persistence.update(
                    event.task_id, RecordChanges(progress=progress), if_status=ACTIVE_STATUSES
                )
        elif isinstance(event, DownloadStateChanged) and event.state == "downloading":
            # Only a download still queued: a pause saved meanwhile must not be undone.
            with contextlib.suppress(StaleChange):
                await self._persistence.update(
                    event.task_id,
                    RecordChanges(status=DownloadStatus.DOWNLOADING),
                    if_status={DownloadStatus.QUEUED},
                )
        elif isinstance(event, WorkerRestarted):
            log.warning("libtorrent worker restarted (%d so far): %s", event.restarts, event.reason)


def _what(event: SessionEvent) -> str:
    return _RETRIED.get(type(event), event.kind)
