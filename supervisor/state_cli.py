"""`dlkeeper-state`: look at and recover the persisted state (CONTRACT section 4).

A thin layer over `actors.recovery` (what to check, keep, quarantine or rebuild) and
`actors.statefile` (the lock, and the daemon's own atomic writes). `show` and `check` only read
and work while the daemon runs; every other command takes the daemon's lock first and refuses
with exit status 3 while a daemon holds it. No command ever leaves a half-written file or throws
state away: a file it replaces is kept beside it, a download it takes out goes to
`downloads.json.quarantine`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from actors.atomic import read_small_file, write_file_atomically
from actors.errors import (
    ConfigError,
    CorruptState,
    DlkeeperError,
    StateError,
    StateLocked,
    StateTooNew,
)
from actors.layout import Layout, replay_torrent
from actors.recovery import (
    Problem,
    Rejected,
    check_records,
    is_resumable,
    merge_quarantine,
    quarantined_downloads,
    read_resume,
    reconcile,
    record_json,
    salvage,
    torrent_from_resume,
)
from actors.state import (
    CURRENT_VERSION,
    DecodedState,
    DownloadRecord,
    DownloadStatus,
    MigrationContext,
    decode_state,
)
from actors.statefile import StateStore, keep_recreated_torrents, utc_stamp
from supervisor import __version__, exits
from supervisor.cli import add_path_flags, path_flags
from supervisor.config import load_config

# A FILE given to `restore --from` is read only if it is a regular file below this size.
_MAX_STATE_BYTES = 1024 * 1024 * 1024

_EPILOG = (
    "Exit status: 0 done (check: no problems), 1 problems found or nothing done (the reason is "
    "printed), 2 bad flags or config, 3 a running daemon holds the state lock."
)
_WRITING_EPILOG = (
    "Exit status: 0 done, 1 nothing done (the reason is printed), 2 bad flags or config, "
    "3 a running daemon holds the state lock."
)


class _Refused(Exception):
    """A command that stops with one line on stderr and an exit status, having changed nothing
    (or, after writing started, nothing that is not reported)."""

    def __init__(self, message: str, status: int = exits.FAILURE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Library:
    store: StateStore
    paths: Layout

    @property
    def context(self) -> MigrationContext:
        return self.store.migration


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlkeeper-state",
        description=(
            "Inspect and recover dlkeeper's persisted download state "
            "({library_path}/data/downloads.json and {download_path}/torrents/). "
            "show and check only read; the other commands refuse to run while the daemon does."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"dlkeeper-state {__version__}")
    add_path_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    show = commands.add_parser(
        "show",
        help="list the persisted downloads (read-only; works while the daemon runs)",
        description="List the downloads in downloads.json without taking the lock or changing it.",
    )
    show.add_argument("--json", action="store_true", help="print the state as JSON")
    check = commands.add_parser(
        "check",
        help="list every problem that would stop a download from resuming (read-only)",
        description=(
            "Validate downloads.json against the schema, and check each download's .torrent "
            "(its info hash too) or magnet link, its resume data and its save path (it must "
            "lie inside download_path). Read-only; works while the daemon runs. "
            "Exit status 0 when there is no problem, 1 otherwise."
        ),
    )
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    commands.add_parser(
        "repair",
        help="move the downloads that cannot be resumed to downloads.json.quarantine",
        description=(
            "Keep every download that can be resumed and move the others (no usable .torrent "
            "and no usable magnet link, or an entry that is not a valid download) into "
            "downloads.json.quarantine, with the reason. A lost .torrent is first recreated "
            "from the resume data when that holds the torrent's info. The previous state file "
            "is kept (as downloads.json.bak, or downloads.json.corrupt-<time> when it did not "
            "load). A file that is not JSON at all cannot be repaired: use restore or rebuild."
        ),
        epilog=_WRITING_EPILOG,
    )
    rebuild = commands.add_parser(
        "rebuild",
        help="recreate downloads.json from downloads.json.bak and the files in torrents/",
        description=(
            "Recreate a lost or damaged downloads.json. It starts from downloads.json.bak when "
            "that loads (peers, torrent_metadata, validation_metadata, magnet links, pause "
            "state), adds every download whose {download_path}/torrents/<task_id>.torrent or "
            ".fastresume the backup lacks, and takes pause state and progress from resume data "
            "saved after the backup (the backup is one write behind). A download of the backup "
            "whose .torrent copy and resume data are both gone was cancelled or acknowledged "
            "after the backup: it is left out, into downloads.json.quarantine. A download "
            "only the files know gets name, info hash, save path, file priorities, pause state "
            "and progress from its resume data, but no peers or metadata. Refuses to replace "
            "a state file that loads unless --force; a replaced file is kept as "
            "downloads.json.before-rebuild-<time> (or .corrupt-<time>)."
        ),
        epilog=_WRITING_EPILOG,
    )
    rebuild.add_argument(
        "--force", action="store_true", help="replace a state file even though it loads"
    )
    restore = commands.add_parser(
        "restore",
        help="put downloads.json.bak (or --from FILE) back in place, after validating it",
        description=(
            "Validate downloads.json.bak (or FILE) and make it the state; the current "
            "downloads.json, if any, is kept as downloads.json.before-restore-<time>. "
            "An invalid FILE changes nothing (exit status 1)."
        ),
        epilog=_WRITING_EPILOG,
    )
    restore.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="FILE",
        help="a state file to restore (default: downloads.json.bak)",
    )
    remove = commands.add_parser(
        "remove",
        help="drop one download from the state",
        description=(
            "Drop the download TASK_ID from downloads.json. Its entry is added to "
            "downloads.json.quarantine, and its .torrent/.fastresume copies and downloaded "
            "files are left in place, so it can be put back. Exit status 1 for an unknown "
            "TASK_ID."
        ),
        epilog=_WRITING_EPILOG,
    )
    remove.add_argument("task_id", metavar="TASK_ID", help="the download to drop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(path_flags(args))
    except ConfigError as exc:
        print(f"dlkeeper-state: {exc}", file=sys.stderr)
        return exits.CONFIG
    library = _Library(
        StateStore(config.layout.state_dir, MigrationContext(download_path=config.download_path)),
        config.layout,
    )
    try:
        if args.command == "show":
            return _show(library.store, as_json=args.json)
        if args.command == "check":
            return _check(library, as_json=args.json)
        _require_folder(config.library_path)
        with _locked(library.store):
            if args.command == "repair":
                return _repair(library)
            if args.command == "rebuild":
                return _rebuild(library, force=args.force)
            if args.command == "restore":
                return _restore(library, args.source)
            return _remove(library, args.task_id)
    except _Refused as exc:
        print(f"dlkeeper-state: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dlkeeper-state: {where}{exc.strerror or exc}", file=sys.stderr)
        return exits.FAILURE


def _require_folder(library_path: Path) -> None:
    # A mistyped --library-path must not leave a new data/ folder and lock file behind.
    if not library_path.is_dir():
        raise _Refused(f"no library folder at {library_path}")


@contextlib.contextmanager
def _locked(store: StateStore) -> Iterator[None]:
    try:
        store.acquire_lock()
    except StateLocked as exc:
        raise _Refused(f"{exc}; stop the daemon first", exits.LOCKED) from None
    except StateError as exc:  # the state folder cannot be made or written
        raise _Refused(str(exc)) from None
    try:
        yield
    finally:
        store.release_lock()


# --- show ---------------------------------------------------------------------------------------


def _show(store: StateStore, *, as_json: bool) -> int:
    try:
        decoded = store.read()
    except (CorruptState, StateTooNew) as exc:
        print(f"dlkeeper-state: {store.path}: {exc}", file=sys.stderr)
        return exits.FAILURE
    downloads = decoded.downloads if decoded is not None else {}
    if as_json:
        payload = {
            "version": 1,
            "downloads": {k: r.model_dump(mode="json") for k, r in downloads.items()},
        }
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
        return exits.OK
    if decoded is None:
        print(f"no state file at {store.path}")
        return exits.OK
    if decoded.from_version != 1:
        print(f"(version {decoded.from_version} file: the daemon migrates it when it next starts)")
    count = len(downloads)
    print(f"{_count(count, 'download')} in {store.path}")
    for record in sorted(downloads.values(), key=lambda r: r.created_at):
        print(_line(record))
    return exits.OK


def _line(record: DownloadRecord) -> str:
    return (
        f"{record.task_id:24} {record.status:11} {record.progress:6.1%}  "
        f"{record.info_hash or '-':40}  {record.name}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# --- check --------------------------------------------------------------------------------------


def _check(library: _Library, *, as_json: bool) -> int:
    store = library.store
    problems: list[Problem] = []
    hints: list[str] = []
    count: int | None = None  # None: there are no downloads to count (no file, or unreadable)
    try:
        raw = store.path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem(None, f"no state file at {store.path}"))
        hints.extend(_recreate_hints(library))
    else:
        try:
            salvaged = salvage(raw, store.path, library.context)
        except (CorruptState, StateTooNew) as exc:
            problems.append(Problem(None, f"{store.path} does not load: {exc}", resumable=False))
            if isinstance(exc, CorruptState):
                hints.extend(_recreate_hints(library))
        else:
            count = len(salvaged.downloads) + len(salvaged.rejected)
            if salvaged.problem is not None:
                problems.append(
                    Problem(None, f"{store.path} does not load: {salvaged.problem}", False)
                )
            problems.extend(
                Problem(key, rejected.reason, resumable=False)
                for key, rejected in salvaged.rejected.items()
            )
            if salvaged.from_version != CURRENT_VERSION:
                hints.append(
                    f"{store.path} is a version {salvaged.from_version} file: the daemon "
                    "migrates it when it next starts (keeping the old file)"
                )
            problems.extend(check_records(salvaged.downloads, library.paths))
            if salvaged.problem is not None or not all(p.resumable for p in problems):
                hints.append(
                    "`dlkeeper-state repair` keeps what can be resumed and moves the rest to "
                    f"{store.quarantine_path.name}"
                )
            if any(p.task_id is not None and ".torrent" in p.message for p in problems):
                hints.append(
                    "`dlkeeper-state repair` first writes a lost .torrent back from its resume "
                    "data when that holds the torrent's info"
                )
    if as_json:
        payload = {
            "state_file": str(store.path),
            "downloads": count,
            "ok": not problems,
            "problems": [
                {"task_id": p.task_id, "message": p.message, "resumable": p.resumable}
                for p in problems
            ],
            "hints": hints,
        }
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        summary = _count(len(problems), "problem") if problems else "no problems"
        counted = "" if count is None else f"{_count(count, 'download')}, "
        print(f"{store.path}: {counted}{summary}")
        for problem in problems:
            print(f"  {problem}")
        for hint in hints:
            print(f"hint: {hint}")
    return exits.FAILURE if problems else exits.OK


def _recreate_hints(library: _Library) -> list[str]:
    hints: list[str] = []
    store = library.store
    try:
        backup = decode_state(store.backup_path.read_bytes(), store.backup_path, library.context)
    except FileNotFoundError:
        pass
    except (CorruptState, StateTooNew) as exc:
        hints.append(f"the backup {store.backup_path} does not load either: {exc}")
    else:
        hints.append(
            f"`dlkeeper-state restore` puts back the backup {store.backup_path} "
            f"({_count(len(backup.downloads), 'download')}; the daemon also falls back to it)"
        )
    torrents = library.paths.torrents_dir
    found = sorted(torrents.glob("*.torrent")) + sorted(torrents.glob("*.fastresume"))
    if found:
        hints.append(
            "`dlkeeper-state rebuild` recreates the state from the "
            f"{_count(len(found), '.torrent/.fastresume file')} in {torrents}"
        )
    return hints


# --- repair -------------------------------------------------------------------------------------


def _repair(library: _Library) -> int:
    store, paths = library.store, library.paths
    try:
        raw = store.path.read_bytes()
    except FileNotFoundError:
        raise _Refused(
            f"no state file at {store.path}: nothing to repair "
            "(`dlkeeper-state restore` or `dlkeeper-state rebuild` recreate it)"
        ) from None
    try:
        salvaged = salvage(raw, store.path, library.context)
    except StateTooNew as exc:
        raise _Refused(str(exc)) from None
    except CorruptState as exc:
        raise _Refused(
            f"{store.path} cannot be repaired: {exc}; `dlkeeper-state restore` puts back the "
            "backup, `dlkeeper-state rebuild` recreates the state from the .torrent/.fastresume "
            "files"
        ) from None
    existing_quarantine = _read_quarantine(store)
    downloads = dict(salvaged.downloads)
    recreated = _recreate_torrents(downloads, paths)
    quarantine: dict[str, Rejected] = dict(salvaged.rejected)
    for task_id, record in list(downloads.items()):
        if not is_resumable(record, paths):
            reasons = [p.message for p in check_records({task_id: record}, paths)]
            quarantine[task_id] = Rejected(record_json(record), "; ".join(reasons))
            del downloads[task_id]
    if not (quarantine or recreated or salvaged.problem) and salvaged.from_version == (
        CURRENT_VERSION
    ):
        print(f"nothing to repair: every download in {store.path} can be resumed")
        _print_remaining(downloads, paths)
        return exits.OK
    if quarantine:
        data = merge_quarantine(existing_quarantine, quarantine, datetime.now(UTC))
        write_file_atomically(store.quarantine_path, data)
    if salvaged.problem is not None:
        aside = store.set_aside("corrupt")
    elif salvaged.from_version != CURRENT_VERSION:
        aside = store.set_aside(f"v{salvaged.from_version}")
    else:
        aside = None
    store.write(downloads)
    for task_id in recreated:
        print(f"recreated {paths.torrent_path(task_id)} from its resume data")
    for task_id, rejected in quarantine.items():
        print(f"quarantined {task_id}: {rejected.reason}")
    kept_as = aside.name if aside is not None else store.backup_path.name
    print(
        f"kept {_count(len(downloads), 'download')} in {store.path}; the previous file is "
        f"{kept_as}"
        + (f", the quarantined entries are in {store.quarantine_path.name}" if quarantine else "")
    )
    _print_remaining(downloads, paths)
    return exits.OK


def _recreate_torrents(downloads: dict[str, DownloadRecord], paths: Layout) -> list[str]:
    """Writes a lost or broken .torrent back from the resume data's copy of the torrent's info,
    and points the record at it. The broken file, if any, is kept as `.corrupt-<time>`."""
    recreated: list[str] = []
    for task_id, record in downloads.items():
        if record.status is DownloadStatus.FAILED or replay_torrent(record, paths).problem is None:
            continue
        try:
            resume = read_resume(paths.resume_path(task_id))
        except (OSError, DlkeeperError):
            continue
        torrent = torrent_from_resume(resume, record.info_hash) if resume is not None else None
        if torrent is None:
            continue
        kept = paths.torrent_path(task_id)
        if kept.exists():
            kept.rename(kept.with_name(f"{kept.name}.corrupt-{utc_stamp()}"))
        write_file_atomically(kept, torrent)
        downloads[task_id] = record.model_copy(update={"torrent_file_path": str(kept)})
        recreated.append(task_id)
    return recreated


def _read_quarantine(store: StateStore) -> bytes | None:
    """The quarantine file's bytes (None: there is none), refused unless repair can add to it."""
    path = store.quarantine_path
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        merge_quarantine(existing, {}, datetime.now(UTC))
    except CorruptState as exc:
        raise _Refused(
            f"{path} is not a quarantine file ({exc}); move it away and run repair again"
        ) from None
    return existing


def _print_remaining(downloads: dict[str, DownloadRecord], paths: Layout) -> None:
    remaining = check_records(downloads, paths)
    if remaining:
        print("left as they are (the daemon resumes them anyway):")
        for problem in remaining:
            print(f"  {problem}")


# --- rebuild ------------------------------------------------------------------------------------


def _rebuild(library: _Library, *, force: bool) -> int:
    store, paths = library.store, library.paths
    current = _current_state(library)
    backup, backup_problem = _read_backup(store)
    sources = f"{paths.torrents_dir}" + (f" and {store.backup_path.name}" if backup else "")
    merged = reconcile(
        backup.downloads if backup is not None else None,
        _mtime_ns(store.backup_path) if backup is not None else None,
        paths,
        quarantined_downloads(_quarantine_bytes(store)),
    )
    if current is not None and not force:
        print(f"would rebuild {_count(len(merged.downloads), 'download')} from {sources}:")
        for record in merged.downloads.values():
            print(_line(record))
        raise _Refused(
            f"not replacing {store.path}: it loads ({current}); "
            "--force replaces it, keeping it as downloads.json.before-rebuild-<time>"
        )
    if not merged.downloads:
        reasons = "".join(f"; {task}: {why}" for task, why in merged.skipped.items())
        raise _Refused(f"nothing to rebuild from in {sources}{reasons}")
    if merged.dropped:
        data = merge_quarantine(_read_quarantine(store), merged.dropped, datetime.now(UTC))
        write_file_atomically(store.quarantine_path, data)
    keep_recreated_torrents(merged, paths)
    label = "before-rebuild" if current is not None else "corrupt"
    aside = store.set_aside(label)
    store.write(merged.downloads)
    print(f"rebuilt {_count(len(merged.downloads), 'download')} in {store.path} from {sources}:")
    for record in merged.downloads.values():
        print(_line(record))
    for note in merged.notes:
        print(f"  {note}")
    for task_id, why in merged.skipped.items():
        print(f"skipped {task_id}: {why}")
    if merged.dropped:
        print(f"the entries left out are kept in {store.quarantine_path.name}")
    if aside is not None:
        print(f"the replaced state file is kept as {aside.name}")
    if backup is None:
        if backup_problem is not None:
            print(backup_problem)
        print("not recoverable from these files: peers, torrent_metadata, validation_metadata")
    else:
        only_files = [t for t in merged.downloads if t not in backup.downloads]
        if only_files:
            print(
                f"not recoverable for {', '.join(only_files)} (not in {store.backup_path.name}): "
                "peers, torrent_metadata, validation_metadata"
            )
    return exits.OK


def _read_backup(store: StateStore) -> tuple[DecodedState | None, str | None]:
    """The backup when it loads; else None and, when there is one, why it is not used."""
    try:
        raw = read_small_file(store.backup_path, _MAX_STATE_BYTES)
    except FileNotFoundError:
        return None, None
    except (OSError, DlkeeperError) as exc:
        return None, f"{store.backup_path.name} cannot be read ({exc}); rebuilt from the files"
    try:
        return decode_state(raw, store.backup_path, store.migration), None
    except (CorruptState, StateTooNew) as exc:
        return None, f"{store.backup_path.name} does not load ({exc}); rebuilt from the files"


def _quarantine_bytes(store: StateStore) -> bytes | None:
    try:
        return store.quarantine_path.read_bytes()
    except FileNotFoundError:
        return None


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _current_state(library: _Library) -> str | None:
    """A description of the state file when it loads ("N downloads"), else None (missing or
    corrupt). A newer dlkeeper's file is refused: it is not ours to replace."""
    store = library.store
    try:
        decoded = store.read()
    except CorruptState:
        return None
    except StateTooNew as exc:
        raise _Refused(f"not replacing it: {exc}") from None
    return None if decoded is None else _count(len(decoded.downloads), "download")


# --- restore ------------------------------------------------------------------------------------


def _restore(library: _Library, source: Path | None) -> int:
    store = library.store
    source = source if source is not None else store.backup_path
    try:
        raw = read_small_file(source, _MAX_STATE_BYTES)
    except FileNotFoundError:
        what = "no backup" if source == store.backup_path else "no file"
        raise _Refused(f"not restored: {what} at {source}") from None
    except DlkeeperError as exc:  # not a regular file, or far too large to be a state file
        raise _Refused(f"not restored: {exc}") from None
    try:
        decoded: DecodedState = decode_state(raw, source, library.context)
    except (CorruptState, StateTooNew) as exc:
        raise _Refused(f"not restored: {source} is not a valid state file: {exc}") from None
    aside = store.set_aside("before-restore")
    store.write(decoded.downloads)
    migrated = (
        f" (migrated from version {decoded.from_version})"
        if decoded.from_version != CURRENT_VERSION
        else ""
    )
    print(
        f"restored {_count(len(decoded.downloads), 'download')} from {source} "
        f"into {store.path}{migrated}"
    )
    if aside is not None:
        print(f"the replaced state file is kept as {aside.name}")
    problems = check_records(decoded.downloads, library.paths)
    if problems:
        print(f"`dlkeeper-state check` finds {_count(len(problems), 'problem')} in it")
    return exits.OK


# --- remove -------------------------------------------------------------------------------------


def _remove(library: _Library, task_id: str) -> int:
    store = library.store
    try:
        decoded = store.read()
    except (CorruptState, StateTooNew) as exc:
        raise _Refused(
            f"{store.path} does not load ({exc}); `dlkeeper-state repair` or `restore` it first"
        ) from None
    if decoded is None:
        raise _Refused(f"no state file at {store.path}")
    if task_id not in decoded.downloads:
        raise _Refused(f"no download {task_id} in {store.path}")
    downloads = {k: r for k, r in decoded.downloads.items() if k != task_id}
    record = decoded.downloads[task_id]
    # Kept in the quarantine file: the .bak undoes a remove only until the next write.
    removed = {task_id: Rejected(record_json(record), "removed by `dlkeeper-state remove`")}
    data = merge_quarantine(_read_quarantine(store), removed, datetime.now(UTC))
    write_file_atomically(store.quarantine_path, data)
    if decoded.from_version != CURRENT_VERSION:
        store.set_aside(f"v{decoded.from_version}")
    store.write(downloads)
    print(
        f"removed {task_id} ({record.name}); its entry is kept in "
        f"{store.quarantine_path.name}, its .torrent/.fastresume copies and downloaded files "
        "are left in place"
    )
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
