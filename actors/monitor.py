"""The monitor actor: turns what the session reports into durable state, then tells the bot.

It consumes the session actor's events, in order, and records each in the state file before
anything else may act on it: a finished download becomes `completed` with `completed_at`, a
download that errored (or could not be replayed) becomes `failed` with the reason, and a
magnet's kept `.torrent` is recorded so that no later resume depends on peers for metadata.
The daemon starts it only after the replay, so completions that libtorrent reported while the
saved downloads were being replayed are handled then, neither lost nor early.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.bus import EventBus
from actors.downloads import completed_event, failed_event
from actors.errors import DlkeeperError, NotFound, StaleChange
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
from actors.persistence import Persistence
from actors.problems import Problems
from actors.state import ACTIVE_STATUSES, DownloadStatus

log = logging.getLogger(__name__)


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

    async def run(self, inbox: MemoryObjectReceiveStream[Envelope[None]]) -> None:
        # The work comes from the event stream; the inbox closing is the signal to stop.
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._consume)
            async for _ in inbox:
                pass
            task_group.cancel_scope.cancel()  # an event being recorded is recorded first
        # What the session reported before the stop is recorded too, in order: the progress
        # of the resume data saved on stop, say.
        while True:
            try:
                event = self._events.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await self._handle(event)

    async def _consume(self) -> None:
        async for event in self._events:
            with anyio.CancelScope(shield=True):
                await self._handle(event)

    async def _handle(self, event: SessionEvent) -> None:
        try:
            await self._record(event)
        except NotFound:
            log.info("%s for a download no longer kept; ignored", event.kind)
        except DlkeeperError as exc:
            log.error("could not record %s: %s", event.kind, exc)

    async def _record(self, event: SessionEvent) -> None:
        if isinstance(event, DownloadFinished):
            record = await self._persistence.get(event.task_id)
            if record.status in ACTIVE_STATUSES:
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
            if record.status in ACTIVE_STATUSES:  # a completed download stays completed
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
