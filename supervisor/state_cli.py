"""`dlkeeper-state`: look at and recover the persisted state (CONTRACT section 4)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import orjson

from actors.state import CorruptState, MigrationContext
from actors.statefile import StateStore
from supervisor.cli import add_path_flags, path_flags
from supervisor.config import load_config
from supervisor.errors import ConfigError, StateTooNew

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlkeeper-state",
        description="Inspect and recover dlkeeper's persisted download state.",
    )
    add_path_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    show = commands.add_parser(
        "show",
        help="list the persisted downloads (read-only; works while the daemon runs)",
        description="List the downloads in downloads.json without taking the lock or changing it.",
    )
    show.add_argument("--json", action="store_true", help="print the state as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(path_flags(args))
    except ConfigError as exc:
        print(f"dlkeeper-state: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = StateStore(config.state_dir, MigrationContext(download_path=config.download_path))
    return _show(store, as_json=args.json)


def _show(store: StateStore, *, as_json: bool) -> int:
    try:
        decoded = store.read()
    except (CorruptState, StateTooNew) as exc:
        print(f"dlkeeper-state: {store.path}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    downloads = decoded.downloads if decoded is not None else {}
    if as_json:
        payload = {
            "version": 1,
            "downloads": {k: r.model_dump(mode="json") for k, r in downloads.items()},
        }
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    if decoded is None:
        print(f"no state file at {store.path}")
        return EXIT_OK
    if decoded.from_version != 1:
        print(f"(version {decoded.from_version} file: the daemon migrates it when it next starts)")
    count = len(downloads)
    plural = "" if count == 1 else "s"
    print(f"{count} download{plural} in {store.path}")
    for record in sorted(downloads.values(), key=lambda r: r.created_at):
        print(
            f"{record.task_id:24} {record.status:11} {record.progress:6.1%}  "
            f"{record.info_hash or '-':40}  {record.name}"
        )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
