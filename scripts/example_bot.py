"""The bot's side of dlkeeper, as a runnable example to copy: add a download, wait for its
completion, import it into a library folder, then ack it.

    .venv/bin/python scripts/example_bot.py --library /srv/media/movies 'magnet:?xt=...'
    .venv/bin/python scripts/example_bot.py --library /srv/media/movies film.torrent --forever

What makes it safe to crash, restart or run twice:

- the download's `task_id` is derived from what is downloaded, so running the bot again after a
  crash adds nothing new: the daemon answers with the download it already has;
- the daemon keeps a completion until it is acked and offers it again on every subscribe (after
  a bot crash, after a daemon restart), so the import below may run more than once for the same
  download and is written to give the same result every time;
- the ack goes only after the imported files are on disk, so a crash or power cut loses no
  import: at worst the completion is offered, and imported, again.

What makes it safe against a hostile torrent: every file's path is resolved (symlinks too) and
must stay inside the download's save_path and inside the library, or nothing of that completion
is imported and it is left unacked, with one line saying which file and why.

Without `--forever` it exits once its own download is imported (0), has failed or was refused
(1); with it, it keeps importing every completion, as a bot's main loop would. Completions of
other downloads that arrive meanwhile are imported too: this bot is the daemon's only client.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import sys
from pathlib import Path, PurePosixPath

import anyio

from supervisor.client import (
    DaemonUnavailable,
    DlkeeperClient,
    DlkeeperError,
    DownloadCompletedEvent,
    DownloadFailedEvent,
    Duplicate,
    NotFound,
)

log = logging.getLogger("example_bot")


def stable_task_id(source: str) -> str:
    """The same magnet (or .torrent file content) always gives the same task_id."""
    data = Path(source).read_bytes() if not source.startswith("magnet:") else source.encode()
    return "bot-" + hashlib.sha256(data).hexdigest()[:16]


class UnsafePath(Exception):
    """A completion names a file that would be read from outside its save_path or written
    outside the library."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def planned_imports(event: DownloadCompletedEvent, library: Path) -> list[tuple[Path, Path]]:
    """(source, target) of every downloaded file of `event`, both resolved, symlinks too.

    Raises `UnsafePath` if any file is absolute, has a `..`, or resolves outside the save_path
    (source) or outside `library` (target): a torrent names its own files, and the daemon's
    word that they are safe is not taken on trust.
    """
    save_path = Path(event.save_path).resolve()
    root = library.resolve()
    planned = []
    for file in event.files:
        if file.priority == 0:
            continue  # skipped by the bot's choice: never downloaded
        relative = PurePosixPath(file.path)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise UnsafePath(f"{event.task_id}: the file path {file.path!r} is not relative")
        source = (save_path / relative).resolve()
        target = (root / relative).resolve()
        if not _within(source, save_path):
            raise UnsafePath(f"{event.task_id}: {file.path!r} leads out of {save_path}")
        if not _within(target, root):
            raise UnsafePath(f"{event.task_id}: {file.path!r} would be written outside {root}")
        planned.append((source, target))
    return planned


def import_download(event: DownloadCompletedEvent, library: Path) -> list[Path]:
    """Puts every downloaded file of `event` at the same relative path under `library`.

    Idempotent: each file is hard-linked (copied when the library is on another file system)
    to a temporary name and renamed over the target, so a second run replaces a file with the
    same bytes, and a crash midway leaves no half-written file under the real name. Every
    touched folder is fsynced before it returns, so an ack sent after it loses nothing.
    Raises `UnsafePath`, before touching anything, for a file that leaves either folder.
    """
    imported = []
    folders = set()
    for source, target in planned_imports(event, library):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.importing")
        partial.unlink(missing_ok=True)
        try:
            partial.hardlink_to(source)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            copy_file(source, partial)
        partial.replace(target)
        imported.append(target)
        folders.add(target.parent)
    for folder in folders:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return imported


def copy_file(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())


async def add_download(dlkeeper: DlkeeperClient, args: argparse.Namespace, task_id: str) -> str:
    """Adds the download (or finds it already added) and returns the task_id to wait for."""
    peers = [args.peer] if args.peer else None
    metadata = {"source": "example_bot", "library": str(args.library)}
    try:
        if args.source.startswith("magnet:"):
            added = await dlkeeper.add(
                magnet=args.source, task_id=task_id, peers=peers, torrent_metadata=metadata
            )
        else:
            added = await dlkeeper.add_torrent_file(
                args.source, task_id=task_id, peers=peers, torrent_metadata=metadata
            )
    except Duplicate as exc:
        # The same torrent under another task_id (say, added by hand): wait for that one.
        log.info("already downloading as %s; waiting for that one", exc.task_id)
        return exc.task_id
    log.info("added %s (%s): %s", added.task_id, added.info_hash, added.status)
    return added.task_id


async def serve(dlkeeper: DlkeeperClient, library: Path, task_id: str, forever: bool) -> int:
    """Imports and acks every completion, acks failures; returns when `task_id` is done."""
    while True:
        try:
            async for event in dlkeeper.events():
                if isinstance(event, DownloadCompletedEvent):
                    try:
                        files = await anyio.to_thread.run_sync(import_download, event, library)
                    except UnsafePath as exc:
                        # Never acked: a person should look at it (and cancel or ack it).
                        log.error("refusing to import %s; left unacked", exc)
                        if event.task_id == task_id and not forever:
                            return 1
                        continue
                    log.info("imported %s: %d files into %s", event.task_id, len(files), library)
                elif isinstance(event, DownloadFailedEvent):
                    log.error("download %s failed: %s", event.task_id, event.error)
                else:
                    continue
                with contextlib.suppress(NotFound):  # acked before a crash, or by another bot
                    await dlkeeper.ack(event.task_id)
                log.info("acked %s", event.task_id)
                if event.task_id == task_id and not forever:
                    return 0 if isinstance(event, DownloadCompletedEvent) else 1
        except DaemonUnavailable as exc:
            # The daemon is restarting (or gone for longer than connect_timeout): wait again.
            # It offers every unacked completion again when the client subscribes anew.
            log.warning("%s; still waiting", exc)
            continue
        return 1  # the events end only when the client is closed


async def run(args: argparse.Namespace) -> int:
    try:
        task_id = args.task_id or stable_task_id(args.source)
        async with DlkeeperClient(args.socket, connect_timeout=args.connect_timeout) as dlkeeper:
            await dlkeeper.subscribe()
            task_id = await add_download(dlkeeper, args, task_id)
            return await serve(dlkeeper, args.library, task_id, args.forever)
    except DlkeeperError as exc:  # no daemon, a refused add, ...: one line, no traceback
        log.error("%s", exc)
        return 1
    except OSError as exc:  # an unreadable .torrent, a library it cannot write to, ...
        where = f"{exc.filename}: " if exc.filename else ""
        log.error("%s%s", where, exc.strerror or exc)
        return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="example_bot.py",
        description="Add a download to dlkeeper, import it into a library folder when it "
        "completes, then ack it. Safe to kill and run again.",
    )
    parser.add_argument("source", help="a magnet link, or the path of a .torrent file")
    parser.add_argument(
        "--library", type=Path, required=True, help="folder to import the files into"
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=Path("/run/dlkeeper/api.sock"),
        help="dlkeeper's socket (default: /run/dlkeeper/api.sock)",
    )
    parser.add_argument("--peer", metavar="HOST:PORT", help="a peer to connect to at once")
    parser.add_argument(
        "--task-id", help="the download's task_id (default: derived from the source)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the daemon at the start before giving up (default: 30); "
        "once connected, it waits for a restarted daemon as long as it takes",
    )
    parser.add_argument(
        "--forever", action="store_true", help="keep importing completions; never exit"
    )
    args = parser.parse_args(argv)
    if not args.source.startswith("magnet:") and not Path(args.source).is_file():
        parser.error(f"{args.source} is neither a magnet link nor a .torrent file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="example_bot: %(message)s")
    try:
        return anyio.run(run, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
