"""`dlkeeper`: the command line (console script entry point `main`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from supervisor import __version__
from supervisor.app import EXIT_CONFIG, EXIT_FAILURE, EXIT_LOCKED, EXIT_OK, run_daemon
from supervisor.config import PathFlags, load_config
from supervisor.errors import ConfigError, StateLocked, first_dlkeeper_error


def add_path_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that `dlkeeper serve` and `dlkeeper-state` share."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: $DLKEEPER_CONFIG, else built-in defaults)",
    )
    parser.add_argument(
        "--library-path", type=Path, metavar="DIR", help="library folder; state in DIR/data/"
    )
    parser.add_argument(
        "--download-path",
        type=Path,
        metavar="DIR",
        help="payload folder, with .torrent and .fastresume copies in DIR/torrents/",
    )


def path_flags(args: argparse.Namespace) -> PathFlags:
    return PathFlags(
        config=args.config,
        library_path=args.library_path,
        download_path=args.download_path,
        socket=getattr(args, "socket", None),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlkeeper",
        description="Keeps a media bot's BitTorrent downloads alive across restarts and crashes.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(path_flags(args))
    except ConfigError as exc:
        print(f"dlkeeper: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        anyio.run(run_daemon, config)
    except BaseException as exc:
        return _exit_status(exc)
    return EXIT_OK


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_OK
    error = first_dlkeeper_error(exc)
    if error is None:
        raise exc
    print(f"dlkeeper: {error}", file=sys.stderr)
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    return EXIT_LOCKED if isinstance(error, StateLocked) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
