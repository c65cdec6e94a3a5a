"""`dlkeeper watch`: a live view of the downloads that carries on across daemon restarts.

On a terminal, one progress bar per download redrawn in place (rich Live); otherwise one line per
change. Kept apart from `supervisor.commands` so that the one-shot commands do not load rich Live.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import anyio
from anyio import CancelScope
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from supervisor import exits, render
from supervisor.client import (
    ApiEvent,
    DaemonUnavailable,
    DlkeeperClient,
    DownloadCompletedEvent,
    DownloadFailedEvent,
    DownloadInfo,
    DownloadPausedEvent,
    DownloadProgressEvent,
    DownloadRemovedEvent,
    DownloadResumedEvent,
)

# `watch` lists again this often, for what events do not carry: status changes such as
# queued -> downloading, a magnet's size once its metadata arrives, downloads acked elsewhere.
RELIST_EVERY = 5.0
# ... and when events ask for it, but not more often than this.
RELIST_AT_MOST_EVERY = 1.0
# After a failed reconnect that failed at once (no permission, say), before trying again.
RETRY_PAUSE = 0.5
# How often a quiet watch asks whether the reader of its pipe is still there.
READER_CHECK_EVERY = 0.5
# The live view redraws at most this often; progress events may come much faster.
REDRAW_EVERY = 0.25


class _View:
    """The downloads as `watch` knows them, and whether the daemon is there."""

    def __init__(self, socket_path: Path, downloads: Sequence[DownloadInfo]) -> None:
        self.socket_path = socket_path
        self.rows: dict[str, render.Row] = {}
        self.away_since: float | None = None  # monotonic time the daemon went away
        self.replace(downloads)

    def replace(self, downloads: Sequence[DownloadInfo]) -> None:
        self.rows = {info.task_id: render.Row.of(info) for info in downloads}

    def apply(self, event: ApiEvent) -> bool:
        """Applies one event. True when the view needs a fresh `list`: the event names a
        download it does not know, or one in a passing status (queued, checking, fetching
        metadata) whose end no event announces."""
        row = self.rows.get(event.task_id)
        if isinstance(event, DownloadRemovedEvent):
            self.rows.pop(event.task_id, None)
            return False
        if isinstance(event, DownloadCompletedEvent):
            if row is None:
                size = sum(file.size for file in event.files)
                row = render.Row(event.task_id, event.name, "completed", 1.0, size, 0, 0, None)
                self.rows[event.task_id] = row
            row.stop("completed")
            row.progress = 1.0
            return False
        if row is None:
            return True
        if isinstance(event, DownloadProgressEvent):
            row.progress = event.progress
            row.download_rate = event.download_rate
            row.num_peers = event.num_peers
        elif isinstance(event, DownloadFailedEvent):
            row.stop("failed")
            row.error = event.error
        elif isinstance(event, DownloadPausedEvent):
            row.stop("paused")
        elif isinstance(event, DownloadResumedEvent):
            row.status = "queued"  # what the daemon records on resume
        return row.status in render.PASSING_STATUSES


class _Screen(Protocol):
    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def show(self, view: _View) -> None:
        """The view changed."""

    async def run(self, view: _View) -> None:
        """Redraws in the background, for as long as the screen needs it."""


class _LiveScreen:
    """On a terminal: one bar per download, redrawn in place (rich Live)."""

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, auto_refresh=False, vertical_overflow="ellipsis")
        self._changed = True

    def __enter__(self) -> _LiveScreen:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()

    def show(self, view: _View) -> None:
        self._changed = True

    async def run(self, view: _View) -> None:
        while True:
            # Redrawn every second while away, for the time counter.
            if self._changed or view.away_since is not None:
                self._changed = False
                self._live.update(self.render(view), refresh=True)
            await anyio.sleep(REDRAW_EVERY if view.away_since is None else 1.0)

    @staticmethod
    def render(view: _View) -> RenderableType:
        count = len(view.rows)
        header = Text(f"dlkeeper at {view.socket_path} — {count} download{'s' * (count != 1)}")
        if view.away_since is not None:
            away = render.duration(time.monotonic() - view.away_since)
            header = Text(f"reconnecting… (dlkeeper at {view.socket_path} away for {away})")
            header.stylize("bold yellow")
        table = Table(box=None, pad_edge=False, expand=True, header_style="bold")
        table.add_column("NAME", no_wrap=True, overflow="ellipsis", ratio=1, min_width=10)
        table.add_column("PROGRESS", ratio=1, min_width=10, max_width=40)
        table.add_column("DONE", justify="right", no_wrap=True)
        table.add_column("RATE", justify="right", no_wrap=True)
        table.add_column("PEERS", justify="right", no_wrap=True)
        table.add_column("ETA", justify="right", no_wrap=True)
        table.add_column("STATUS", no_wrap=True, overflow="ellipsis", max_width=30)
        for row in view.rows.values():
            status = render.status(row)
            if row.error:
                status.append(f": {row.error}")
            table.add_row(
                Text(row.name),
                ProgressBar(total=1.0, completed=row.progress),
                f"{int(row.progress * 100)}%",
                f"{render.short_size(row.download_rate)}/s" if row.active else "",
                str(row.num_peers) if row.active else "",
                render.eta(row) if row.active else "",
                status,
            )
        if not view.rows:
            return Group(header, Text("no downloads yet", style="dim"))
        return Group(header, table)


class _LineScreen:
    """Not a terminal (a pipe, a log, TERM=dumb): one line per change, nothing redrawn.

    A download gets a line when its status or its whole percent changes, or it goes away.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._shown: dict[str, tuple[str, int, str | None]] = {}
        self._away = False

    def __enter__(self) -> _LineScreen:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def show(self, view: _View) -> None:
        if view.away_since is not None and not self._away:
            self._say(f"dlkeeper at {view.socket_path} went away — reconnecting…")
        elif view.away_since is None and self._away:
            self._say(f"reconnected to dlkeeper at {view.socket_path}")
        self._away = view.away_since is not None
        for row in view.rows.values():
            key = (row.status, int(row.progress * 100), row.error)
            if self._shown.get(row.task_id) != key:
                self._shown[row.task_id] = key
                self._say(self.line(row))
        for task_id in [task_id for task_id in self._shown if task_id not in view.rows]:
            del self._shown[task_id]
            self._say(f"{task_id}  removed")

    async def run(self, view: _View) -> None:
        return None

    @staticmethod
    def line(row: render.Row) -> str:
        parts = [row.task_id, row.status, f"{int(row.progress * 100)}%"]
        if row.active:
            parts += [
                render.rate(row.download_rate),
                _peers(row.num_peers),
                f"ETA {render.eta(row)}",
            ]
        parts.append(row.name)
        if row.error:
            parts.append(f"— {row.error}")
        return "  ".join(parts)

    def _say(self, text: str) -> None:
        # soft_wrap: one line per change, however narrow the console.
        self._console.print(Text(f"{time.strftime('%H:%M:%S')}  {text}"), soft_wrap=True)


def _peers(count: int) -> str:
    return f"{count} peer{'s' * (count != 1)}"


async def watch(
    socket_path: Path, interval: float, console: Console, connect_timeout: float
) -> int:
    """Shows the downloads of the daemon at `socket_path`, live, until Ctrl-C or SIGTERM (exit
    status 0), across daemon restarts; progress every `interval` seconds."""
    async with DlkeeperClient(socket_path, connect_timeout=connect_timeout) as client:
        # Subscribed before listing, so that nothing that happens in between is missed.
        await client.subscribe(progress_interval=interval)
        view = _View(socket_path, await client.list())
        terminal = console.is_terminal and not console.is_dumb_terminal
        screen: _Screen = _LiveScreen(console) if terminal else _LineScreen(console)
        with screen:
            screen.show(view)
            async with anyio.create_task_group() as tasks:
                watcher = _Watcher(client, view, screen, interval, tasks.cancel_scope)
                tasks.start_soon(_cancel_on_signal, tasks.cancel_scope)
                tasks.start_soon(watcher.follow_events)
                tasks.start_soon(watcher.relist_now_and_then)
                tasks.start_soon(screen.run, view)
                tasks.start_soon(_end_when_the_reader_goes)
    return exits.OK


async def _end_when_the_reader_goes() -> None:
    """Raises `ReaderGone` once the reader of stdout's pipe has closed it. A watch with nothing
    to show writes nothing, and would only learn it at its next line (`dlkeeper watch | head`
    would hang); the pipe says so at once (POLLERR on its writing end)."""
    fd = sys.stdout.fileno()
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except OSError:
        return
    poller = select.poll()
    poller.register(fd, 0)  # no events asked for: POLLERR and POLLHUP are always reported
    while True:
        await anyio.sleep(READER_CHECK_EVERY)
        if poller.poll(0):
            raise render.ReaderGone


async def _cancel_on_signal(scope: CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


class _Watcher:
    """Keeps a `_View` up to date from the events, across daemon restarts."""

    def __init__(
        self,
        client: DlkeeperClient,
        view: _View,
        screen: _Screen,
        interval: float,
        scope: CancelScope,
    ) -> None:
        self._client = client
        self._view = view
        self._screen = screen
        self._interval = interval
        self._scope = scope
        self._relist_wanted = anyio.Event()

    async def follow_events(self) -> None:
        events = self._client.events()
        while True:
            try:
                async for event in events:
                    if self._view.apply(event):
                        self._relist_wanted.set()
                    self._screen.show(self._view)
            except DaemonUnavailable:
                await self._wait_for_the_daemon()
            else:
                self._scope.cancel()  # the events end only when the client closes
                return

    async def _wait_for_the_daemon(self) -> None:
        self._view.away_since = time.monotonic()
        self._screen.show(self._view)
        while True:
            try:
                # Each attempt retries with backoff for the client's connect_timeout; the client
                # subscribes every new connection again by itself.
                await self._client.subscribe(progress_interval=self._interval)
                downloads = await self._client.list()
            except DaemonUnavailable:
                await anyio.sleep(RETRY_PAUSE)
                continue
            self._view.replace(downloads)
            self._view.away_since = None
            self._screen.show(self._view)
            return

    async def relist_now_and_then(self) -> None:
        while True:
            with anyio.move_on_after(RELIST_EVERY):
                await self._relist_wanted.wait()
            self._relist_wanted = anyio.Event()
            if self._view.away_since is not None:
                continue  # follow_events lists when the daemon is back
            try:
                downloads = await self._client.list()
            except DaemonUnavailable:
                continue
            if self._view.away_since is None:
                self._view.replace(downloads)
                self._screen.show(self._view)
            await anyio.sleep(RELIST_AT_MOST_EVERY)
