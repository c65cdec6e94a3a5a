"""Info hashes of .torrent files and magnet links, without libtorrent.

Only the session worker imports libtorrent; the parent still needs info hashes (to migrate old
state files, to spot duplicates, for the recovery scripts), and an info hash is just the SHA-1
(v1) or SHA-256 (v2-only) of the bencoded `info` dictionary, so a small strict bdecoder suffices.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from actors.errors import InvalidMagnet, InvalidTorrent

_MAX_DEPTH = 64
_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_BASE32_32 = re.compile(r"[A-Za-z2-7]{32}")
_MULTIHASH_SHA256 = re.compile(r"1220([0-9a-fA-F]{64})")


class _Decoder:
    """A strict bencode parser that records where the top-level `info` value lies."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.info_span: tuple[int, int] | None = None

    def fail(self, reason: str) -> InvalidTorrent:
        return InvalidTorrent(f"not a valid .torrent: {reason} at byte {self.pos}")

    def value(self, depth: int) -> object:
        if depth > _MAX_DEPTH:
            raise self.fail("nesting too deep")
        if self.pos >= len(self.data):
            raise self.fail("unexpected end")
        lead = self.data[self.pos]
        if lead == ord("i"):
            return self.integer()
        if lead == ord("l"):
            self.pos += 1
            items = []
            while self.peek() != ord("e"):
                items.append(self.value(depth + 1))
            self.pos += 1
            return items
        if lead == ord("d"):
            return self.dictionary(depth)
        if ord("0") <= lead <= ord("9"):
            return self.string()
        raise self.fail(f"unexpected byte {lead:#04x}")

    def peek(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end")
        return self.data[self.pos]

    def integer(self) -> int:
        end = self.data.find(b"e", self.pos)
        if end < 0:
            raise self.fail("unterminated integer")
        digits = self.data[self.pos + 1 : end]
        if not re.fullmatch(rb"-?(0|[1-9][0-9]*)", digits) or digits == b"-0":
            raise self.fail("malformed integer")
        self.pos = end + 1
        return int(digits)

    def string(self) -> bytes:
        colon = self.data.find(b":", self.pos)
        if colon < 0 or not re.fullmatch(rb"0|[1-9][0-9]*", self.data[self.pos : colon]):
            raise self.fail("malformed string length")
        length = int(self.data[self.pos : colon])
        start = colon + 1
        if start + length > len(self.data):
            raise self.fail("string runs past the end")
        self.pos = start + length
        return self.data[start : self.pos]

    def dictionary(self, depth: int) -> dict[bytes, object]:
        self.pos += 1
        result: dict[bytes, object] = {}
        while self.peek() != ord("e"):
            key = self.string()
            value_start = self.pos
            result[key] = self.value(depth + 1)
            if depth == 0 and key == b"info":
                self.info_span = (value_start, self.pos)
        self.pos += 1
        return result


def bdecode(data: bytes) -> object:
    """Decodes bencoded `data` (dicts keyed by bytes); raises `InvalidTorrent`."""
    return _decode(data).value


def bencode(value: object) -> bytes:
    """Bencodes what `bdecode` returns (dicts keyed by bytes, lists, ints, bytes); str keys and
    values are taken as UTF-8. Booleans are refused: bencode has none."""
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, str):
        return bencode(value.encode())
    if isinstance(value, list):
        return b"l" + b"".join(bencode(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = sorted(
            (key.encode() if isinstance(key, str) else key, item) for key, item in value.items()
        )
        return b"d" + b"".join(bencode(key) + bencode(item) for key, item in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


@dataclass(frozen=True)
class _Decoded:
    value: object
    info_span: tuple[int, int] | None


def _decode(data: bytes) -> _Decoded:
    decoder = _Decoder(data)
    value = decoder.value(0)
    if decoder.pos != len(data):
        raise decoder.fail("trailing bytes")
    return _Decoded(value, decoder.info_span)


@dataclass(frozen=True)
class TorrentSummary:
    """What dlkeeper reads of a .torrent, from one decoding of it."""

    info_hash: str
    name: str
    files: list[tuple[str, int]]


def read_torrent(data: bytes) -> TorrentSummary:
    """The info hash (SHA-1 for v1 and hybrid, SHA-256 for v2-only, lowercase hex), the name and
    the files (see `torrent_files`) of a .torrent.

    Raises `InvalidTorrent` for anything that is not a bencoded dictionary with an `info`
    dictionary holding a name and pieces (v1) or a file tree (v2), and files.
    """
    decoded = _decode(data)
    root = decoded.value
    if not isinstance(root, dict) or decoded.info_span is None:
        raise InvalidTorrent("not a valid .torrent: no info dictionary")
    info = root[b"info"]
    if not isinstance(info, dict) or not isinstance(info.get(b"name"), bytes):
        raise InvalidTorrent("not a valid .torrent: the info dictionary has no name")
    start, end = decoded.info_span
    if isinstance(info.get(b"pieces"), bytes):
        info_hash = hashlib.sha1(data[start:end]).hexdigest()
    elif isinstance(info.get(b"file tree"), dict):
        info_hash = hashlib.sha256(data[start:end]).hexdigest()
    else:
        raise InvalidTorrent("not a valid .torrent: the info dictionary has no pieces")
    name = info[b"name"].decode("utf-8", "replace")
    return TorrentSummary(info_hash, name, _files(info, name))


def torrent_info_hash(data: bytes) -> str:
    """The info hash of a .torrent (see `read_torrent`); raises `InvalidTorrent`."""
    return read_torrent(data).info_hash


def torrent_name(data: bytes) -> str:
    """The name in a .torrent's info dictionary (invalid UTF-8 replaced), or "" if unreadable."""
    try:
        return read_torrent(data).name
    except InvalidTorrent:
        return ""


def torrent_files(data: bytes) -> list[tuple[str, int]]:
    """The files of a .torrent as (path, size), in libtorrent's order, padding files left out.

    Paths start with the torrent's name for multi-file torrents, as libtorrent reports them.
    Raises `InvalidTorrent`.
    """
    return read_torrent(data).files


def _files(info: dict[bytes, object], name: str) -> list[tuple[str, int]]:
    listed = info.get(b"files")
    if isinstance(listed, list):  # v1 or hybrid, several files
        files = []
        for entry in listed:
            if not isinstance(entry, dict) or b"p" in entry.get(b"attr", b""):
                continue
            parts = [part.decode("utf-8", "replace") for part in entry.get(b"path", [])]
            files.append(("/".join([name, *parts]), int(entry.get(b"length", 0))))
        return files
    length = info.get(b"length")
    if isinstance(length, int):  # v1 or hybrid, one file
        return [(name, length)]
    tree = info.get(b"file tree")
    if isinstance(tree, dict):  # v2 only
        leaves: list[tuple[str, int]] = []
        _walk_file_tree(tree, [], leaves)
        if len(leaves) == 1 and "/" not in leaves[0][0]:
            return leaves  # a single-file v2 torrent: the file is not under the name
        return [("/".join([name, path]), size) for path, size in leaves]
    raise InvalidTorrent("not a valid .torrent: the info dictionary lists no files")


def _walk_file_tree(
    node: dict[bytes, object], parts: list[str], out: list[tuple[str, int]]
) -> None:
    for key in sorted(node):
        child = node[key]
        if key == b"" and isinstance(child, dict):
            length = child.get(b"length", 0)
            out.append(("/".join(parts), length if isinstance(length, int) else 0))
        elif isinstance(child, dict):
            _walk_file_tree(child, [*parts, key.decode("utf-8", "replace")], out)


def magnet_info_hash(uri: str) -> str:
    """The info hash named by a magnet link's `xt` as lowercase hex (v1 preferred over v2).

    Raises `InvalidMagnet` when the link is not a magnet or names no BitTorrent info hash.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() != "magnet":
        raise InvalidMagnet("not a magnet link: it does not start with magnet:")
    v2: str | None = None
    for topic in parse_qs(parts.query).get("xt", []):
        if topic.lower().startswith("urn:btih:"):
            digest = topic[len("urn:btih:") :]
            if _HEX40.fullmatch(digest):
                return digest.lower()
            if _BASE32_32.fullmatch(digest):
                return base64.b32decode(digest.upper()).hex()
            raise InvalidMagnet(f"malformed info hash in magnet link: {digest!r}")
        if topic.lower().startswith("urn:btmh:"):
            match = _MULTIHASH_SHA256.fullmatch(topic[len("urn:btmh:") :])
            if match is None:
                raise InvalidMagnet("malformed v2 info hash in magnet link")
            v2 = match.group(1).lower()
    if v2 is not None:
        return v2
    raise InvalidMagnet("magnet link names no BitTorrent info hash (xt=urn:btih:...)")
