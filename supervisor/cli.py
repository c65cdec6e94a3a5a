"""`dlkeeper`: the command line (console script entry point `main`).

`serve` runs the daemon; the client commands (`ls`, `info`, `add`, `pause`, `resume`, `cancel`,
`ack`, `retry`, `stats`, `watch`) talk to a running daemon through its socket and live in
`supervisor.commands`, imported only when one of them runs: `serve` never loads rich.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from actors.errors import ConfigError, StateLocked, StorageMissing, first_dlkeeper_error
from actors.messages.wire import MAX_PROGRESS_INTERVAL, MIN_PROGRESS_INTERVAL
from supervisor import __version__, exits
from supervisor.config import PathFlags, load_config


def add_path_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that `dlkeeper serve` and `dlkeeper-state` share."""
    _add_config_flag(parser)
    parser.add_argument(
        "--library-path", type=Path, metavar="DIR", help="library folder; state in DIR/data/"
    )
    parser.add_argument(
        "--download-path",
        type=Path,
        metavar="DIR",
        help="payload folder, with .torrent and .fastresume copies in DIR/torrents/",
    )


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: $DLKEEPER_CONFIG, else built-in defaults)",
    )


def path_flags(args: argparse.Namespace) -> PathFlags:
    return PathFlags(
        config=args.config,
        library_path=getattr(args, "library_path", None),
        download_path=getattr(args, "download_path", None),
        socket=getattr(args, "socket", None),
    )


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (MIN_PROGRESS_INTERVAL <= value <= MAX_PROGRESS_INTERVAL) or math.isnan(value):
        raise argparse.ArgumentTypeError(
            f"must be {MIN_PROGRESS_INTERVAL:g} to {MAX_PROGRESS_INTERVAL:g} seconds, got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlkeeper",
        description="Keeps a media bot's BitTorrent downloads alive across restarts and crashes.",
        epilog=(
            "Client commands talk to the running daemon through its socket (--socket, else the "
            "config's socket). Exit status: 0 ok, 1 daemon not running or request refused, "
            "2 bad usage or config. Run `dlkeeper COMMAND --help` for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dlkeeper {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the daemon in the foreground (as systemd does)",
        description=(
            "Run the daemon in the foreground. Exit status: 0 after a clean stop (SIGTERM or "
            "SIGINT), 2 for a bad config or flag, 3 when another daemon holds the library's lock."
        ),
    )
    add_path_flags(serve)
    serve.add_argument("--socket", type=Path, metavar="PATH", help="Unix socket of the message API")
    _add_client_commands(commands)
    demo = commands.add_parser(
        "demo",
        help=(
            "download a test torrent from a local seeder, kill and restart the daemon part-way, "
            "and show that nothing is lost"
        ),
        description=(
            "Download a test torrent from a local seeder, kill and restart the daemon part-way, "
            "and show that nothing is lost. Everything happens in a temporary folder."
        ),
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder afterwards")
    return parser


def _add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    _add_config_flag(connection)
    connection.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the daemon's socket (default: the config's socket, else /run/dlkeeper/api.sock)",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--json", action="store_true", help="print the daemon's result as JSON, for scripts"
    )
    common = [connection, output]

    def command(
        name: str, summary: str, description: str, *, of_one: bool = False
    ) -> argparse.ArgumentParser:
        """A client command; `of_one`: it takes the task id of one download."""
        parser = commands.add_parser(name, parents=common, help=summary, description=description)
        if of_one:
            parser.add_argument("task_id", metavar="ID", help="the download's task id")
        return parser

    command(
        "ls",
        "list the downloads",
        "List every download the daemon keeps, completed and failed ones included until they "
        "are acknowledged: id, name, status, progress, size, rate, peers and time left.",
    )
    command(
        "info",
        "show one download in full, with its files",
        "Show every field of one download, and its files.",
        of_one=True,
    )
    add = command(
        "add",
        "add a download from a magnet link or a .torrent file; prints its task id",
        "Add a download and print its task id. A .torrent file is read here and sent to the "
        "daemon as its content (torrent_b64), so the daemon need not be able to read it; the "
        "daemon keeps its own copy. Adding the same --task-id with the same torrent again is "
        "safe: it answers with the existing download.",
    )
    add.add_argument(
        "source", metavar="MAGNET|FILE.torrent", help="a magnet: link, or a .torrent file"
    )
    add.add_argument("--paused", action="store_true", help="add it paused")
    add.add_argument(
        "--save-path",
        metavar="DIR",
        help="where to save it, inside the daemon's download_path (a relative DIR is taken "
        "from download_path); default: download_path",
    )
    add.add_argument("--name", metavar="N", help="its name (default: the torrent's name)")
    add.add_argument(
        "--task-id",
        metavar="ID",
        help="its task id, [A-Za-z0-9_-]{1,64} (default: the daemon makes one)",
    )
    add.add_argument(
        "--peer",
        action="append",
        metavar="HOST:PORT",
        dest="peers",
        help="a peer to connect to, kept across restarts (repeatable)",
    )
    command(
        "pause",
        "pause a download",
        "Pause a download; it stays paused across daemon restarts until resumed. Prints its "
        "new status (--json: the download, as `info --json` shows it).",
        of_one=True,
    )
    command(
        "resume",
        "resume a paused download",
        "Resume a paused download. Prints its new status: queued, checking or downloading "
        "(--json: the download, as `info --json` shows it).",
        of_one=True,
    )
    cancel = command(
        "cancel",
        "remove a download (its files stay unless --delete-files)",
        "Remove a download from the daemon. Its downloaded files stay unless --delete-files.",
        of_one=True,
    )
    cancel.add_argument(
        "--delete-files", action="store_true", help="also delete its downloaded files"
    )
    command(
        "ack",
        "acknowledge a completed or failed download (the daemon forgets it; files stay)",
        "Tell the daemon a completed or failed download was taken care of: the daemon forgets "
        "it and stops re-sending its event. The downloaded files stay where they are.",
        of_one=True,
    )
    command(
        "retry",
        "start a failed download again, checking the files it has on disk",
        "Start a failed download again from its kept .torrent or magnet, under the same task "
        "id: the files already on disk are checked, not downloaded again, and its error is "
        "cleared. Prints its new status: queued, checking or downloading (--json: the "
        "download, as `info --json` shows it).",
        of_one=True,
    )
    command(
        "stats",
        "show the daemon's counters",
        "Show downloads by status, how many were resumed at start, resume failures, restarts "
        "of the libtorrent worker and the daemon's uptime.",
    )
    watch = commands.add_parser(
        "watch",
        parents=[connection],
        help="a live view of the downloads that carries on across daemon restarts",
        description=(
            "A live view with one progress bar per download: name, percent, rate, peers, time "
            "left and status, updated by the daemon's progress events. When the daemon goes "
            "away it shows 'reconnecting…' and carries on when the daemon is back. When the "
            "output is not a terminal (or TERM=dumb) it prints one line per change instead. "
            "Ctrl-C stops it (exit status 0)."
        ),
    )
    watch.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="seconds between progress updates (default: 1)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        return _demo(keep=args.keep)
    return _client_command(args)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(path_flags(args))
    except ConfigError as exc:
        print(f"dlkeeper: {exc}", file=sys.stderr)
        return exits.CONFIG
    from supervisor.app import run_daemon  # noqa: PLC0415 (the daemon: only for serve)

    try:
        anyio.run(run_daemon, config)
    except BaseException as exc:
        return _exit_status(exc)
    return exits.OK


def _client_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="dlkeeper: %(message)s", stream=sys.stderr)
    try:
        config = load_config(path_flags(args))
    except ConfigError as exc:
        print(f"dlkeeper: {exc}", file=sys.stderr)
        return exits.CONFIG
    from supervisor.commands import run_command  # noqa: PLC0415 (rich: not for serve)

    return run_command(args, config.socket)


def _demo(*, keep: bool) -> int:
    from supervisor.demo import run_demo  # noqa: PLC0415 (rich and the client: not for serve)

    return run_demo(keep=keep)


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return exits.OK
    error = first_dlkeeper_error(exc)
    if error is None:
        raise exc
    print(f"dlkeeper: {error}", file=sys.stderr)
    if isinstance(error, ConfigError):
        return exits.CONFIG
    if isinstance(error, StorageMissing):
        return exits.STORAGE_MISSING
    return exits.LOCKED if isinstance(error, StateLocked) else exits.FAILURE


if __name__ == "__main__":
    sys.exit(main())
