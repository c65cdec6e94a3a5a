"""The demo's seeder: `python -m supervisor.demo_swarm FOLDER [--rate BYTES_PER_S]`.

Writes a deterministic payload under FOLDER/seed/ and its .torrent as FOLDER/demo.torrent, seeds
it from a libtorrent session on 127.0.0.1 (no DHT, LSD, UPnP, NAT-PMP or uTP), then prints one
JSON line on stdout: `{"port", "torrent", "name", "total_bytes", "pieces", "files": {path:
sha256}}`,
and seeds until its stdin closes: the demo that started it, however it ends, never leaves it
running.

It is a process of its own so that the demo never has libtorrent's threads when it forks the
daemon. Logs and errors go to stderr; stdout carries only the JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import libtorrent as lt

from supervisor.loopback import LOOPBACK_SETTINGS

MiB = 1024 * 1024
NAME = "Big Buck Demo (2026)"
# Path under NAME -> size: a film, an extra and subtitles, 48 MiB in all.
FILES: dict[str, int] = {
    "Big Buck Demo (2026).mkv": 40 * MiB,
    "Extras/Making of.mkv": 8 * MiB - 48 * 1024,
    "Big Buck Demo (2026).en.srt": 48 * 1024,
}
PIECE_SIZE = 128 * 1024  # small pieces: smooth progress, and little lost at a kill
START_TIMEOUT = 30.0


def write_payload(seed_root: Path) -> dict[str, str]:
    """Writes FILES under `seed_root/NAME`, the same bytes every run; returns path -> SHA-256."""
    hashes: dict[str, str] = {}
    for relative, size in FILES.items():
        content = random.Random(f"dlkeeper-demo/{relative}").randbytes(size)
        path = seed_root / NAME / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        hashes[f"{NAME}/{relative}"] = hashlib.sha256(content).hexdigest()
    return hashes


def make_torrent(seed_root: Path) -> bytes:
    creator = lt.create_torrent(lt.list_files(str(seed_root / NAME)), PIECE_SIZE)
    lt.set_piece_hashes(creator, str(seed_root))
    return lt.bencode(creator.generate())


def set_upload_rate(session: Any, rate: int) -> None:
    """Limits what the session sends, in bytes/s (0 = no limit)."""
    # Loopback peers are in libtorrent's "local" peer class, which the global limits skip.
    local = session.get_peer_class(session.local_peer_class_id)
    session.set_peer_class(session.local_peer_class_id, {**local, "upload_limit": rate})


def start_seeding(session: Any, torrent: bytes, seed_root: Path) -> None:
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(torrent)
    params.save_path = str(seed_root)
    params.flags |= lt.torrent_flags.seed_mode  # we wrote the files: no hash check
    params.flags &= ~lt.torrent_flags.auto_managed
    params.flags &= ~lt.torrent_flags.paused
    handle = session.add_torrent(params)
    deadline = time.monotonic() + START_TIMEOUT
    # A paused or not yet seeding torrent turns the downloader away, which then waits a minute.
    while not handle.status().is_seeding or handle.status().paused:
        if time.monotonic() > deadline:
            raise TimeoutError("the seeder did not start seeding in time")
        session.wait_for_alert(100)
        session.pop_alerts()


def wait_for_stdin_to_close() -> None:
    while sys.stdin.buffer.read(1 << 16):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.demo_swarm",
        description="Seed the dlkeeper demo's payload on 127.0.0.1 until stdin closes.",
    )
    parser.add_argument("folder", type=Path, help="where to write seed/ and demo.torrent")
    parser.add_argument("--rate", type=int, default=0, help="upload limit, bytes/s (0 = none)")
    args = parser.parse_args(argv)
    seed_root: Path = args.folder / "seed"
    try:
        hashes = write_payload(seed_root)
        torrent = make_torrent(seed_root)
        torrent_path = args.folder / "demo.torrent"
        torrent_path.write_bytes(torrent)
        session = lt.session(cast("lt.settings_pack", LOOPBACK_SETTINGS))
        set_upload_rate(session, args.rate)
        start_seeding(session, torrent, seed_root)
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"demo_swarm: {exc}", file=sys.stderr)
        return 1
    ready = {
        "port": session.listen_port(),
        "torrent": str(torrent_path),
        "name": NAME,
        "total_bytes": sum(FILES.values()),
        "pieces": lt.torrent_info(torrent).num_pieces(),
        "files": hashes,
    }
    print(json.dumps(ready), flush=True)
    try:
        wait_for_stdin_to_close()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
