"""Real payloads and their .torrent files, made with libtorrent (tests may import it)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt


@dataclass(frozen=True)
class Payload:
    """Files of random bytes under `root/name`, and the .torrent that describes them."""

    root: Path
    name: str
    torrent: bytes
    info_hash: str  # as libtorrent reports it: v1 (SHA-1) unless the torrent is v2-only
    file_hashes: dict[str, str]  # path relative to root -> SHA-256 of its content


def make_payload(
    root: Path,
    name: str,
    files: dict[str, int],
    *,
    flags: int = 0,
    piece_size: int = 0,
) -> Payload:
    """Writes `files` (relative path -> size in bytes) of random bytes under `root/name`."""
    hashes: dict[str, str] = {}
    for relative, size in files.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        content = os.urandom(size)
        path.write_bytes(content)
        hashes[str(Path(name) / relative)] = hashlib.sha256(content).hexdigest()
    creator = lt.create_torrent(lt.list_files(str(root / name)), piece_size, flags)
    lt.set_piece_hashes(creator, str(root))
    torrent = lt.bencode(creator.generate())
    info = lt.torrent_info(torrent)
    hashes_of = info.info_hashes()
    info_hash = str(hashes_of.v1) if hashes_of.has_v1() else str(hashes_of.v2)
    return Payload(root, name, torrent, info_hash, hashes)
