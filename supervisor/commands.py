"""The client commands of `dlkeeper`: `ls`, `info`, `add`, `pause`, `resume`, `cancel`, `ack`,
`retry`, `stats` and `watch` (in `supervisor.watch`), each a short session with the running
daemon through `DlkeeperClient`.

Output is a table for people (rich; plain text with no colour codes when it is not a terminal)
or, with `--json`, the result the contract defines. Exit status: 0 done; 1 when the daemon is not
running, does not answer, or refuses the request (one line on stderr, with the contract's error
code); 130 on Ctrl-C, except for `watch`, whose Ctrl-C (or SIGTERM) is its normal end (0); 141,
silently, when the reader of a pipe went away (`dlkeeper watch | head`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import orjson
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from actors.errors import leaves
from supervisor import exits, render
from supervisor.client import (
    DaemonNotRunning,
    DaemonUnavailable,
    DlkeeperClient,
    DownloadInfo,
    ProtocolError,
    RequestError,
    RequestTimeout,
)

# A command run by hand should say at once that the daemon is down, not after the client's 10 s.
CONNECT_TIMEOUT = 2.0

# `ls` shortens ids and names to fit the terminal, but not below these.
MIN_ID_WIDTH = 8
MIN_NAME_WIDTH = 10


class CommandFailed(Exception):
    """A problem found here, before anything was sent (an unreadable .torrent file)."""


Handler = Callable[[DlkeeperClient, argparse.Namespace, Console], Awaitable[int]]


def run_command(args: argparse.Namespace, socket_path: Path) -> int:
    """Runs the client command `args.command` against the daemon at `socket_path`; the exit
    status. User errors are one line on stderr, never a traceback."""
    console = render.OutputConsole(highlight=False)
    try:
        if args.command == "watch":
            from supervisor.watch import watch  # noqa: PLC0415 (rich Live: not for the others)

            return anyio.run(watch, socket_path, args.interval, console, CONNECT_TIMEOUT)
        return anyio.run(_one_shot, HANDLERS[args.command], args, socket_path, console)
    except KeyboardInterrupt:
        return exits.OK if args.command == "watch" else exits.INTERRUPTED
    except BaseException as exc:
        if any(isinstance(error, BrokenPipeError | render.ReaderGone) for error in leaves(exc)):
            # The reader went away (`dlkeeper watch | head`): end as quietly as `cat` would,
            # with nothing left for Python to flush into the closed pipe at exit.
            render.silence_stdout()
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
            files.add_row(Text(file.path), render.size(file.size), str(file.priority))
        console.print(files)
    else:
        console.print("files: not known yet (the magnet's metadata has not arrived)")
    return exits.OK


async def _add(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    source: str = args.source
    if source[:7].lower() == "magnet:":
        add = partial(client.add, magnet=source)
    else:
        add = partial(client.add_torrent_file, source)
    try:
        result = await add(
            task_id=args.task_id,
            name=args.name,
            save_path=args.save_path,
            paused=True if args.paused else None,
            peers=args.peers,
        )
    except OSError as exc:  # only add_torrent_file raises it: the file, before anything was sent
        raise CommandFailed(
            f"cannot read {source}: {exc.strerror or exc} (give a magnet: link or a .torrent file)"
        ) from None
    if args.json:
        _print_json(_jsonable(result))
    else:
        console.print(Text(result.task_id))
    return exits.OK


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


async def _retry(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    return _show_status(await client.retry(args.task_id), args, console)


async def _stats(client: DlkeeperClient, args: argparse.Namespace, console: Console) -> int:
    stats = await client.stats()
    if args.json:
        _print_json(_jsonable(stats))
        return exits.OK
    version = (await client.ping()).version
    counts = ", ".join(f"{count} {status}" for status, count in sorted(stats.downloads.items()))
    fields = [
        ("daemon", f"dlkeeper {version} at {client.socket_path}"),
        ("uptime", render.duration(stats.uptime)),
        ("downloads", counts or "none"),
        ("resumed at start", str(stats.resumed_at_start)),
        ("resume failures", str(stats.resume_failures)),
        ("worker restarts", str(stats.worker_restarts)),
        ("free space", render.free_space(stats.free_bytes)),
    ]
    # One line per problem, all under one key: a sentence each, as the daemon wrote it.
    problems = stats.problems or ("none",)
    fields += [("problems" if index == 0 else "", text) for index, text in enumerate(problems)]
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
    "retry": _retry,
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
        row = render.Row.of(info)
        rows.append(
            [
                Text(info.task_id),
                Text(info.name),
                render.status(row),
                Text(f"{int(info.progress * 100)}%"),
                Text(render.short_size(info.total_bytes) if info.total_bytes else "-"),
                Text(f"{render.short_size(info.download_rate)}/s" if row.active else "-"),
                Text(str(info.num_peers) if row.active else "-"),
                Text(render.eta(row)),
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
    row = render.Row.of(info)
    done = f"{render.percent(info.progress)}"
    if info.total_bytes:
        done += f" ({render.size(info.downloaded_bytes)} of {render.size(info.total_bytes)})"
    return [
        ("task id", Text(info.task_id)),
        ("name", Text(info.name)),
        ("info hash", Text(info.info_hash or "-")),
        ("status", render.status(row)),
        ("progress", Text(done)),
        ("download rate", Text(render.rate(info.download_rate))),
        ("upload rate", Text(render.rate(info.upload_rate))),
        ("peers", Text(str(info.num_peers))),
        ("ETA", Text(render.eta(row))),
        ("save path", Text(info.save_path)),
        ("created at", Text(render.timestamp(info.created_at))),
        ("completed at", Text(render.timestamp(info.completed_at))),
        ("error", Text(info.error or "-")),
    ]


def _print_fields(console: Console, fields: Sequence[tuple[str, Text]]) -> None:
    """`key  value` lines, keys aligned; a long value runs on rather than wrapping."""
    key_width = max(len(key) for key, _ in fields)
    for key, value in fields:
        line = Text(key.ljust(key_width) + "  ", style="bold")
        line.append_text(value)
        console.print(line, soft_wrap=True)
