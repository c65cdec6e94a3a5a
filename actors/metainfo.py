"""Info hashes and file lists of .torrent files, and info hashes of magnet links, without
libtorrent.

Only the session worker imports libtorrent; the parent still needs info hashes (to migrate old
state files, to spot duplicates, for the recovery scripts), and an info hash is just the SHA-1
(v1) or SHA-256 (v2-only) of the bencoded `info` dictionary, so a small strict bdecoder suffices.
It also needs each file's path as libtorrent writes it, for a completion's files: that is
libtorrent's path sanitizer, done again here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from actors.errors import InvalidMagnet, InvalidTorrent

MAX_TORRENT_BYTES = 64 * 1024 * 1024  # the largest .torrent dlkeeper reads or keeps

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
    sha1 = hashlib.sha1(data[start:end]).hexdigest()
    if isinstance(info.get(b"pieces"), bytes):
        info_hash = sha1
    elif isinstance(info.get(b"file tree"), dict):
        info_hash = hashlib.sha256(data[start:end]).hexdigest()
    else:
        raise InvalidTorrent("not a valid .torrent: the info dictionary has no pieces")
    name = info[b"name"].decode("utf-8", "replace")
    return TorrentSummary(info_hash, name, _files(info, sha1))


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

    Each path is the one libtorrent writes under the save path (see `sanitized_path`): for a
    multi-file torrent it starts with the torrent's sanitized name, and it never is absolute
    nor has a `..` or `.` element, whatever the .torrent lists. Raises `InvalidTorrent`.
    """
    return read_torrent(data).files


# --- file paths as libtorrent writes them ---------------------------------------------------------
#
# libtorrent does not write a file where a .torrent says: each path element goes through its
# sanitizer (sanitize_append_path_element in src/torrent_info.cpp; sanitize_path_element in 2.1),
# so `../../etc/x` is written as `_/_/etc/x`, and the bot must hear the path that is on disk.
# These are its rules on POSIX (dlkeeper runs on Linux), checked against the real libtorrent on
# generated hostile file lists by tests/test_hostile_input.py.

_PADDING_MARK = "_____padding_file_"  # BitComet's padding files: libtorrent flags them as pads
# Dropped: separators, NUL, and the invisible formatting characters that make a name look like
# another ("evil\u202evkm.exe" shows as "evilexe.mkv"): direction marks, bidi embeddings and
# isolates, zero-width spaces and joiners, the byte order mark.
_DROPPED = frozenset(
    {ord("/"), ord("\\"), 0, 0x061C, 0xFEFF}
    | set(range(0x200B, 0x2010))
    | set(range(0x202A, 0x202F))
    | set(range(0x2060, 0x2065))
    | set(range(0x2066, 0x206A))
)
_LONG_ELEMENT = 240  # bytes after which an element is cut, keeping a short extension
_EXTENSION_REACH = 10  # how far from an element's end its extension's dot may be
_MAX_TREE_DEPTH = 100
_SHORTEST = {2: 0x80, 3: 0x800, 4: 0x10000}  # smaller values are overlong encodings


def _code_point(data: bytes, start: int) -> tuple[int, int]:
    """The code point at `data[start]` and the bytes it takes, or -1 for an invalid sequence
    (and the bytes libtorrent skips for it)."""
    lead = data[start]
    if lead < 0x80:
        return lead, 1
    if lead >> 5 == 0b110:
        length = 2
    elif lead >> 4 == 0b1110:
        length = 3
    elif lead >> 3 == 0b11110:
        length = 4
    elif lead >> 2 == 0b111110:
        return -1, 5
    else:
        return -1, 1
    if length > len(data) - start:
        return -1, len(data) - start
    value = lead & (0x7F >> length)
    for byte in data[start + 1 : start + length]:
        if not 0x80 <= byte <= 0xBF:
            return -1, length
        value = value << 6 | byte & 0x3F
    if value < _SHORTEST[length] or value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
        return -1, length
    return value, length


def _append_element(path: bytearray, element: bytes, *, force: bool) -> None:
    """Appends one path element to `path` as libtorrent does: separators, NUL and invisible
    formatting characters dropped, control characters and invalid UTF-8 replaced by `_`, an
    element of only dots (`.`, `..`) or of nothing dropped (`force`: replaced by `_`), one of
    over 240 bytes cut (keeping a short extension)."""
    if element == b"." and not force:
        return
    separator = 0
    if path:
        path += b"/"
        separator = 1
    if not element:
        path += b"_"
        return
    added = dots = 0
    kept_extension = False
    index = 0
    while index < len(element):
        code, length = _code_point(element, index)
        if code in _DROPPED:
            index += length
            continue
        if code < 32 or 0x7F <= code <= 0x9F:  # invalid UTF-8, or a C0/C1 control or DEL
            path += b"_"
            added += 1
            index += length
            continue
        path += element[index : index + length]
        if code == ord("."):
            dots += 1
        added += length
        if added >= _LONG_ELEMENT and not kept_extension:
            floor = max(len(element) - _EXTENSION_REACH, index)
            dot = element.rfind(b".", floor + 1)
            if dot < 0:
                break
            kept_extension = True
            index = dot
            continue
        index += length
    if added == dots and added <= 2:
        del path[len(path) - added - (0 if force else separator) :]
        if force:
            path += b"_"
        return
    if not path:
        path += b"_"


def sanitized_path(elements: list[bytes], *, root: str = "") -> str:
    """The path libtorrent writes for a file listed as `elements` (under `root`, a multi-file
    torrent's sanitized name): every element kept as one (`.`, `..` and empty ones become `_`),
    so it never leaves `root`."""
    path = bytearray(root.encode())
    for element in elements:
        _append_element(path, element, force=True)
    return path.decode()


def sanitized_name(name: bytes) -> str:
    """A torrent's name as libtorrent uses it for the folder of a multi-file torrent (or the
    single file): "" when nothing of it is left (`..`, `.`, `/`)."""
    path = bytearray()
    _append_element(path, name, force=False)
    return path.decode()


def _files(info: dict[bytes, object], info_hash_v1: str) -> list[tuple[str, int]]:
    """The files libtorrent makes of an info dictionary (torrent_info::parse_info_section)."""
    raw_name = _string(info, b"name.utf-8")
    if raw_name is None:
        raw_name = _string(info, b"name")
    if raw_name is None:
        raise InvalidTorrent("not a valid .torrent: the info dictionary has no name")
    # A name of nothing but dots or separators: libtorrent names the folder by the info hash.
    name = sanitized_name(raw_name) or info_hash_v1
    version = info.get(b"meta version")
    listed = info.get(b"files")
    tree = info.get(b"file tree")
    if isinstance(version, int) and version >= 2:
        if not isinstance(tree, dict):
            raise InvalidTorrent("not a valid .torrent: a v2 info dictionary has no file tree")
        files: list[tuple[str, int]] = []
        _walk_file_tree(tree, name, isinstance(listed, list), 0, files)
        return files
    if isinstance(tree, dict):
        raise InvalidTorrent("not a valid .torrent: a file tree without a meta version")
    if isinstance(listed, list):
        return [file for entry in listed if (file := _listed_file(entry, name)) is not None]
    if not raw_name:
        raise InvalidTorrent("not a valid .torrent: the info dictionary has an empty name")
    single = sanitized_name(raw_name)
    if not single:
        raise InvalidTorrent(f"not a valid .torrent: the file name {raw_name!r} is not usable")
    if _is_padding(info) or _PADDING_MARK in single:
        return []
    return [(single, _file_size(info))]


def _string(node: dict[bytes, object], key: bytes) -> bytes | None:
    value = node.get(key)
    return value if isinstance(value, bytes) else None


def _is_padding(entry: dict[bytes, object]) -> bool:
    return b"p" in (_string(entry, b"attr") or b"")


def _file_size(entry: dict[bytes, object]) -> int:
    if b"l" in (_string(entry, b"attr") or b""):
        return 0  # a symlink takes no payload bytes
    length = entry.get(b"length")
    if not isinstance(length, int) or length < 0:
        raise InvalidTorrent("not a valid .torrent: a file has no valid length")
    return length


def _listed_file(entry: object, name: str) -> tuple[str, int] | None:
    """A v1 `files` entry as (path, size), or None for a padding file."""
    if not isinstance(entry, dict):
        raise InvalidTorrent("not a valid .torrent: a file entry is not a dictionary")
    size = _file_size(entry)
    elements = entry.get(b"path.utf-8")
    if not isinstance(elements, list):
        elements = entry.get(b"path")
    if isinstance(elements, list) and elements:
        if not all(isinstance(element, bytes) for element in elements):
            raise InvalidTorrent("not a valid .torrent: a file path holds a non-string")
        path = sanitized_path(elements, root=name)
    elif _is_padding(entry):
        return None
    else:
        raise InvalidTorrent("not a valid .torrent: a file has no path")
    if _is_padding(entry) or _PADDING_MARK in path:
        return None
    return path, size


def _walk_file_tree(
    node: dict[bytes, object],
    root: str,
    has_file_list: bool,
    depth: int,
    out: list[tuple[str, int]],
) -> None:
    # In libtorrent's order: the order of the keys in the .torrent, not a sorted one.
    if depth > _MAX_TREE_DEPTH:
        raise InvalidTorrent("not a valid .torrent: the file tree is too deep")
    for key, child in node.items():
        if not isinstance(child, dict) or not key:
            raise InvalidTorrent("not a valid .torrent: malformed file tree")
        leaf = len(child) == 1 and b"" in child
        # A v2-only torrent of one file: the file is not under the torrent's name.
        single = leaf and not has_file_list and len(node) == 1
        path = sanitized_path([key.lstrip(b"/")], root="" if single else root)
        if not leaf:
            _walk_file_tree(child, path, True, depth + 1, out)
            continue
        entry = child[b""]
        if not isinstance(entry, dict) or _is_padding(entry):
            raise InvalidTorrent("not a valid .torrent: malformed file tree entry")
        out.append((path, _file_size(entry)))


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
