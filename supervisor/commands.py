"""The client commands of `dlkeeper`: `ls`, `info`, `add`, `pause`, `resume`, `cancel`, `ack`,
`stats` and `watch`, each a short session with the running daemon through `DlkeeperClient`.

Output is a table for people (rich; plain text with no colour codes when it is not a terminal)
or, with `--json`, the result the contract defines. Exit status: 0 done; 1 when the daemon is not
running, does not answer, or refuses the request (one line on stderr, with the contract's error
code); 130 on Ctrl-C, except for `watch`, whose Ctrl-C (or SIGTERM) is its normal end (0); 141,
silently, when the reader of a pipe went away (`dlkeeper watch | head`).
"""

from __future__ import annotations

import argparse
import base64
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import anyio
import orjson
from anyio import CancelScope
from pydantic import BaseModel
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from actors.atomic import read_small_file
from actors.errors import DlkeeperError, leaves
from supervisor import exits
from supervisor.client import (
    ApiEvent,
    DaemonNotRunning,
    DaemonUnavailable,
    DlkeeperClient,
    DownloadCompletedEvent,
    DownloadFailedEvent,
    DownloadInfo,
    DownloadPausedEvent,
    DownloadProgressEvent,
    DownloadRemovedEvent,
    DownloadResumedEvent,
    ProtocolError,
    RequestError,
    RequestTimeout,
)

# A command run by hand should say at once that the daemon is down, not after the client's 10 s.
CONNECT_TIMEOUT = 2.0
# The largest .torrent sent as its content: base64 of it must fit in the daemon's 8 MiB line.
MAX_INLINE_TORRENT = 6 * 1024 * 1024
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

# `ls` shortens ids and names to fit the terminal, but not below these.
MIN_ID_WIDTH = 8
MIN_NAME_WIDTH = 10

PASSING_STATUSES = frozenset({"queued", "checking", "fetching_metadata"})
ACTIVE_STATUSES = PASSING_STATUSES | {"downloading"}
STATUS_STYLES = {
    "downloading": "cyan",
    "completed": "green",
    "failed": "bold red",
    "paused": "yellow",
}


class CommandFailed(Exception):
    """A problem found here, before anything was sent (an unreadable .torrent file)."""


class ReaderGone(Exception):
    """The reader of stdout closed it (a pipe into `head`)."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own raises SystemExit, which a task group then reports as a crash.
        _silence_stdout()
        raise ReaderGone


def _silence_stdout() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


Handler = Callable[[DlkeeperClient, argparse.Namespace, Console], Awaitable[int]]


def run_command(args: argparse.Namespace, socket_path: Path) -> int:
    """Runs the client command `args.command` against the daemon at `socket_path`; the exit
    status. User errors are one line on stderr, never a traceback."""
    console = _Console(highlight=False)
    try:
        if args.command == "watch":
            return anyio.run(_watch, socket_path, args.interval, console)
        return anyio.run(_one_shot, HANDLERS[args.command], args, socket_path, console)
    except KeyboardInterrupt:
        return exits.OK if args.command == "watch" else exits.INTERRUPTED
    except BaseException as exc:
        if any(isinstance(error, BrokenPipeError | ReaderGone) for error in leaves(exc)):
            # The reader went away (`dlkeeper watch | head`): end as quietly as `cat` would,
            # with nothing left for Python to flush into the closed pipe at exit.
            _silence_stdout()
            return exits.BROKEN_PIPE
        problem = _problem(exc)
        if problem is None:
            raise
        print(problem, file=sys.stderr)
        return exits.FAILURE


async def _one_shot(
    handler: Handler, args: argparse.Namespace, socket_path: Path, console: Console
) -> int:
    async with DlkeeperClient(socket_path, connect_timeout=CONNECT_TIMEOUT) as client:
        return await handler(client, args, console)


def _problem(exc: BaseException) -> str | None:
    """The one line to print for an error the user can act on; None for a bug."""
    for error in leaves(exc):
        if isinstance(error, RequestTimeout):
            return f"dlkeeper: {error.message}"
        if isinstance(error, DaemonNotRunning):
            return f"no dlkeeper at {error.socket_path} — is the service running?"
        if isinstance(error, DaemonUnavailable):
            return f"dlkeeper: {error.message}"
        if isinstance(error, RequestError):
            return f"dlkeeper: {error.code}: {error.message}"
        if isinstance(error, ProtocolError | CommandFailed):
            return f"dlkeeper: {error}"
    return None


# --- the one-shot commands ----------------------------------------------------------------------


async def _ls(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    downloads = await client.list()
    if args.json:
        _print_json({"downloads": [_jsonable(info) for info in downloads]})
    elif not downloads:
        console.print("no downloads")
    else:
        console.print(_downloads_table(downloads, console.width))
    return exits.OK


async def _info(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    info = await client.get(args.task_id)
    if args.json:
        _print_json(_jsonable(info))
        return exits.OK
    _print_fields(console, _details(info))
    console.print()
    if info.files:
        files = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        files.add_column("FILE", overflow="fold")
        files.add_column("SIZE", justify="right", no_wrap=True)
        files.add_column("PRIORITY", justify="right", no_wrap=True)
        for file in info.files:
            files.add_row(Text(file.path), _size(file.size), str(file.priority))
        console.print(files)
    else:
        console.print("files: not known yet (the magnet's metadata has not arrived)")
    return exits.OK


async def _add(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    source: str = args.source
    magnet = torrent_b64 = torrent_path = None
    if source[:7].lower() == "magnet:":
        magnet = source
    else:
        torrent_b64, torrent_path = await _torrent_file(source)
    result = await client.add(
        magnet=magnet,
        torrent_b64=torrent_b64,
        torrent_path=torrent_path,
        task_id=args.task_id,
        name=args.name,
        save_path=args.save_path,
        paused=True if args.paused else None,
        peers=args.peers,
    )
    if args.json:
        _print_json(_jsonable(result))
    else:
        console.print(Text(result.task_id))
    return exits.OK


async def _torrent_file(source: str) -> tuple[str | None, str | None]:
    """The .torrent's content as base64, or for one too large to send, its absolute path."""
    path = anyio.Path(source)
    try:
        if (await path.stat()).st_size > MAX_INLINE_TORRENT:
            # Too large for one request line: the daemon reads it itself, if it may.
            return None, str(await path.absolute())
        # Not a plain read: a FIFO would block it for good, a device feed it without end.
        data = await anyio.to_thread.run_sync(read_small_file, Path(source), MAX_INLINE_TORRENT)
    except (OSError, DlkeeperError) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        raise CommandFailed(
            f"cannot read {source}: {reason} (give a magnet: link or a .torrent file)"
        ) from None
    return base64.b64encode(data).decode("ascii"), None


async def _pause(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    return _show_status(await client.pause(args.task_id), args, console)


async def _resume(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    return _show_status(await client.resume(args.task_id), args, console)


def _show_status(info: DownloadInfo, args: argparse.Namespace, console: Console) -> int:
    if args.json:
        _print_json(_jsonable(info))
    else:
        console.print(Text(f"{info.task_id}: {info.status}"))
    return exits.OK


async def _cancel(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    await client.cancel(args.task_id, delete_files=args.delete_files)
    if args.json:
        _print_json({})
    else:
        files = "its files deleted" if args.delete_files else "its files kept"
        console.print(Text(f"{args.task_id}: cancelled, {files}"))
    return exits.OK


async def _ack(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    await client.ack(args.task_id)
    if args.json:
        _print_json({})
    else:
        console.print(Text(f"{args.task_id}: acknowledged, the daemon forgot it (files kept)"))
    return exits.OK


async def _stats(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    stats = await client.stats()
    if args.json:
        _print_json(_jsonable(stats))
        return exits.OK
    version = (await client.ping()).version
    counts = ", ".join(f"{count} {status}" for status, count in sorted(stats.downloads.items()))
    fields = [
        ("daemon", f"dlkeeper {version} at {client.socket_path}"),
        ("uptime", _duration(stats.uptime)),
        ("downloads", counts or "none"),
        ("resumed at start", str(stats.resumed_at_start)),
        ("resume failures", str(stats.resume_failures)),
        ("worker restarts", str(stats.worker_restarts)),
    ]
    _print_fields(console, [(key, Text(value)) for key, value in fields])
    return exits.OK


HANDLERS: dict[str, Handler] = {
    "ls": _ls,
    "info": _info,
    "add": _add,
    "pause": _pause,
    "resume": _resume,
    "cancel": _cancel,
    "ack": _ack,
    "stats": _stats,
}


# --- rendering ----------------------------------------------------------------------------------


def _jsonable(model: BaseModel) -> Any:
    return model.model_dump(mode="json")


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def _downloads_table(downloads: Sequence[DownloadInfo], width: int) -> Table:
    """The downloads, one a line, fitted to `width` columns by shortening ids and names."""
    rows: list[list[Text]] = []
    for info in downloads:
        row = _Row.of(info)
        rows.append(
            [
                Text(info.task_id),
                Text(info.name),
                _status(row),
                Text(f"{int(info.progress * 100)}%"),
                Text(_short_size(info.total_bytes) if info.total_bytes else "-"),
                Text(f"{_short_size(info.download_rate)}/s" if row.active else "-"),
                Text(str(info.num_peers) if row.active else "-"),
                Text(_eta(row)),
            ]
        )
    headers = ["ID", "NAME", "STATUS", "DONE", "SIZE", "RATE", "PEERS", "ETA"]
    widths = [
        max(len(header), *(row[index].cell_len for row in rows))
        for index, header in enumerate(headers)
    ]
    # Columns are 2 apart. Ids and names share what is left: an id keeps up to half of it (and
    # its first 16 characters, the length of a made-up one), a name the rest.
    room = width - sum(widths[2:]) - 2 * (len(headers) - 1)
    id_room = min(max(16, room // 2), room - MIN_NAME_WIDTH)
    widths[0] = max(MIN_ID_WIDTH, min(widths[0], id_room))
    widths[1] = max(MIN_NAME_WIDTH, min(widths[1], room - widths[0]))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for index, header in enumerate(headers):
        justify: Literal["left", "right"] = "left" if index < 3 else "right"
        table.add_column(
            header, width=widths[index], no_wrap=True, overflow="ellipsis", justify=justify
        )
    for cells in rows:
        table.add_row(*cells)
    return table


def _details(info: DownloadInfo) -> list[tuple[str, Text]]:
    row = _Row.of(info)
    done = f"{_percent(info.progress)}"
    if info.total_bytes:
        done += f" ({_size(info.downloaded_bytes)} of {_size(info.total_bytes)})"
    return [
        ("task id", Text(info.task_id)),
        ("name", Text(info.name)),
        ("info hash", Text(info.info_hash or "-")),
        ("status", _status(row)),
        ("progress", Text(done)),
        ("download rate", Text(_rate(info.download_rate))),
        ("upload rate", Text(_rate(info.upload_rate))),
        ("peers", Text(str(info.num_peers))),
        ("ETA", Text(_eta(row))),
        ("save path", Text(info.save_path)),
        ("created at", Text(_time(info.created_at))),
        ("completed at", Text(_time(info.completed_at))),
        ("error", Text(info.error or "-")),
    ]


def _print_fields(console: Console, fields: Sequence[tuple[str, Text]]) -> None:
    """`key  value` lines, keys aligned; a long value runs on rather than wrapping."""
    key_width = max(len(key) for key, _ in fields)
    for key, value in fields:
        line = Text(key.ljust(key_width) + "  ", style="bold")
        line.append_text(value)
        console.print(line, soft_wrap=True)


def _status(row: _Row) -> Text:
    return Text(row.status, style=STATUS_STYLES.get(row.status, ""))


def _percent(progress: float) -> str:
    return f"{progress * 100:.1f}%"


def _size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    for unit in units:
        count /= 1024
        if count < 1024 or unit == units[-1]:
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def _short_size(count: float) -> str:
    """At most 5 characters: 999B, 1023K, 7.6M, 12G."""
    for unit in ("B", "K", "M", "G", "T"):
        if count < 1000 or unit == "T":
            return f"{count:.1f}{unit}" if unit != "B" and count < 10 else f"{count:.0f}{unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _rate(per_second: int) -> str:
    return f"{_size(per_second)}/s"


def _duration(seconds: float) -> str:
    whole = round(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _eta(row: _Row) -> str:
    left = row.seconds_left()
    return "-" if left is None else _duration(left)


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S %Z")


# --- watch --------------------------------------------------------------------------------------


@dataclass
class _Row:
    """What `watch` shows of one download."""

    task_id: str
    name: str
    status: str
    progress: float
    total_bytes: int
    download_rate: int
    num_peers: int
    error: str | None

    @classmethod
    def of(cls, info: DownloadInfo) -> _Row:
        return cls(
            task_id=info.task_id,
            name=info.name,
            status=info.status,
            progress=info.progress,
            total_bytes=info.total_bytes,
            download_rate=info.download_rate,
            num_peers=info.num_peers,
            error=info.error,
        )

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def seconds_left(self) -> float | None:
        if not self.active or self.download_rate <= 0 or self.total_bytes <= 0:
            return None
        return (1.0 - self.progress) * self.total_bytes / self.download_rate

    def stop(self, status: str) -> None:
        self.status = status
        self.download_rate = 0
        self.num_peers = 0


class _View:
    """The downloads as `watch` knows them, and whether the daemon is there."""

    def __init__(self, socket_path: Path, downloads: Sequence[DownloadInfo]) -> None:
        self.socket_path = socket_path
        self.rows: dict[str, _Row] = {}
        self.away_since: float | None = None  # monotonic time the daemon went away
        self.replace(downloads)

    def replace(self, downloads: Sequence[DownloadInfo]) -> None:
        self.rows = {info.task_id: _Row.of(info) for info in downloads}

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
                row = _Row(event.task_id, event.name, "completed", 1.0, size, 0, 0, None)
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
        return row.status in PASSING_STATUSES


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
            away = _duration(time.monotonic() - view.away_since)
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
            status = _status(row)
            if row.error:
                status.append(f": {row.error}")
            table.add_row(
                Text(row.name),
                ProgressBar(total=1.0, completed=row.progress),
                f"{int(row.progress * 100)}%",
                f"{_short_size(row.download_rate)}/s" if row.active else "",
                str(row.num_peers) if row.active else "",
                _eta(row) if row.active else "",
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
    def line(row: _Row) -> str:
        parts = [row.task_id, row.status, f"{int(row.progress * 100)}%"]
        if row.active:
            parts += [_rate(row.download_rate), _peers(row.num_peers), f"ETA {_eta(row)}"]
        parts.append(row.name)
        if row.error:
            parts.append(f"— {row.error}")
        return "  ".join(parts)

    def _say(self, text: str) -> None:
        # soft_wrap: one line per change, however narrow the console.
        self._console.print(Text(f"{time.strftime('%H:%M:%S')}  {text}"), soft_wrap=True)


def _peers(count: int) -> str:
    return f"{count} peer{'s' * (count != 1)}"


async def _watch(socket_path: Path, interval: float, console: Console) -> int:
    async with DlkeeperClient(socket_path, connect_timeout=CONNECT_TIMEOUT) as client:
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
            raise ReaderGone


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
