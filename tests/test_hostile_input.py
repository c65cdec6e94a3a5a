"""Hostile input, and no acknowledged lie about it (issue 10): a request value the state file
cannot hold is refused on its own and costs nothing else, and the file paths the bot hears are
the ones libtorrent writes, whatever a .torrent lists."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import libtorrent as lt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import BadRequest, StateWriteFailed
from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from actors.metainfo import bdecode, bencode, torrent_files
from actors.persistence import Persistence, PersistenceActor
from actors.statefile import LoadSource, StateStore
from tests.api import (
    Served,
    b64,
    error_of,
    fixture_fresh,  # noqa: F401 (a fixture)
    line,
    subscribe,
    wait_event,
)
from tests.records import make_record
from tests.swarm import seeding
from tests.torrents import Payload, make_payload

pytestmark = pytest.mark.timeout(60)

DEADLINE = 20.0


def nested(levels: int) -> dict[str, Any]:
    """A JSON object `levels` objects deep."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def magnet() -> str:
    return f"magnet:?xt=urn:btih:{uuid.uuid4().hex + uuid.uuid4().hex[:8]}"


# --- values the state file cannot hold ----------------------------------------------------------


def test_an_add_the_state_file_cannot_hold_is_refused_alone_and_the_daemon_lives_on(
    fresh: Served,
) -> None:
    # orjson reads 1,024 levels but writes 254: such an add used to kill the persistence actor,
    # and the daemon with it, losing the replies of every add in the same write.
    requests: dict[str, dict[str, Any]] = {
        "good-1": {"magnet": magnet()},
        "deep-torrent": {"magnet": magnet(), "torrent_metadata": nested(260)},
        "deep-validation": {"magnet": magnet(), "validation_metadata": nested(600)},
        "good-2": {"magnet": magnet()},
    }
    with fresh.client() as client:
        client.send_raw(
            b"".join(
                line({"id": task_id, "op": "add", "task_id": task_id, **params})
                for task_id, params in requests.items()
            )
        )
        replies = {reply["id"]: reply for reply in (client.read_reply() for _ in requests)}
        assert replies["good-1"]["ok"] and replies["good-2"]["ok"], replies
        for task_id, field in (
            ("deep-torrent", "torrent_metadata"),
            ("deep-validation", "validation_metadata"),
        ):
            error = error_of(replies[task_id])
            assert error["code"] == "bad_request"
            assert error["message"].startswith(f"{field} cannot be saved"), error
        assert client.call("ping")["ready"] is True
    assert fresh.daemon.process.poll() is None
    assert set(fresh.library.state()) == {"good-1", "good-2"}


@asynccontextmanager
async def running(store: StateStore) -> AsyncIterator[Persistence]:
    async with actor_group() as group:
        yield Persistence(await group.start(PersistenceActor(store)))


def on_disk(store: StateStore) -> dict[str, Any]:
    downloads = orjson.loads(store.path.read_bytes())["downloads"]
    assert isinstance(downloads, dict)
    return downloads


@pytest.mark.anyio
async def test_metadata_as_deep_as_the_state_file_holds_is_saved_one_level_more_is_refused(
    store: StateStore,
) -> None:
    deepest = make_record("deepest").model_copy(update={"torrent_metadata": nested(251)})
    too_deep = make_record("too-deep").model_copy(update={"torrent_metadata": nested(252)})
    with anyio.fail_after(DEADLINE):
        async with running(store) as persistence:
            await persistence.add(deepest)
            with pytest.raises(BadRequest, match=r"^torrent_metadata cannot be saved"):
                await persistence.add(too_deep)
            later = await persistence.add(make_record("later"))
            assert not later.existed
        async with running(store) as persistence:  # and what was saved loads again
            assert set(await persistence.snapshot()) == {"deepest", "later"}


@pytest.mark.anyio
async def test_an_update_the_state_file_cannot_hold_is_refused_and_the_record_kept(
    store: StateStore,
) -> None:
    with anyio.fail_after(DEADLINE):
        async with running(store) as persistence:
            await persistence.add(make_record("kept"))
            with pytest.raises(BadRequest, match=r"^error cannot be saved"):
                await persistence.update("kept", RecordChanges(error="lone \ud800 surrogate"))
            assert (await persistence.get("kept")).error is None
            await persistence.update("kept", RecordChanges(progress=0.5))
    assert on_disk(store)["kept"]["progress"] == 0.5


@pytest.mark.anyio
async def test_a_write_failing_with_any_error_fails_its_batch_and_the_actor_carries_on(
    store: StateStore,
) -> None:
    # Not an OSError: the store refuses to write without its lock (StateError). Any such
    # failure used to end the actor, and the daemon with it.
    with anyio.fail_after(DEADLINE):
        async with running(store) as persistence:
            await persistence.add(make_record("kept"))
            store.release_lock()
            try:
                with pytest.raises(StateWriteFailed, match="lock"):
                    await persistence.add(make_record("refused"))
            finally:
                store.acquire_lock()
            await persistence.add(make_record("later"))
            assert set(await persistence.snapshot()) == {"kept", "later"}
    assert set(on_disk(store)) == {"kept", "later"}


def test_a_state_file_with_a_value_too_deep_to_write_back_is_quarantined_not_loaded(
    store: StateStore,
) -> None:
    # A hand-edited file orjson reads but cannot write: loaded, every later write would fail.
    entry = orjson.loads(make_record("deep").to_json())
    entry["torrent_metadata"] = nested(300)
    store.path.write_text(json.dumps({"version": 1, "downloads": {"deep": entry}}))
    store.acquire_lock()
    try:
        downloads, report = store.load()
    finally:
        store.release_lock()
    assert downloads == {}
    assert report.source is LoadSource.EMPTY
    assert len(report.quarantined) == 1 and report.quarantined[0].exists()
    assert "downloads.deep: torrent_metadata cannot be saved" in report.problems[0]


# --- file paths as libtorrent writes them -------------------------------------------------------


def libtorrent_files(data: bytes) -> list[tuple[str, int]] | None:
    """(path, size) of each file libtorrent writes for a .torrent, pads left out; None when
    libtorrent refuses the .torrent."""
    try:
        storage = lt.torrent_info(data).layout()
    except RuntimeError:
        return None
    return [
        (storage.file_path(i), storage.file_size(i))
        for i in range(storage.num_files())
        if not storage.file_flags(i) & lt.file_storage.flag_pad_file
    ]


def v1_torrent(name: bytes, paths: list[list[bytes]], *, utf8: bool = False) -> bytes:
    path_key, name_key = (b"path.utf-8", b"name.utf-8") if utf8 else (b"path", b"name")
    files = [{b"length": 1 + index, path_key: path} for index, path in enumerate(paths)]
    total = sum(1 + index for index in range(len(paths)))
    info = {
        b"name": name,
        name_key: name,
        b"piece length": 16384,
        b"files": files,
        b"pieces": b"\1" * 20 * -(-total // 16384),
    }
    return bencode({b"info": info})


@pytest.mark.parametrize(
    ("listed", "written"),
    [
        ([b"..", b"..", b"..", b"etc", b"cron.d", b"x"], "show/_/_/_/etc/cron.d/x"),
        ([b"/etc", b"passwd"], "show/etc/passwd"),
        ([b".", b"a"], "show/_/a"),
        ([b"", b"a"], "show/_/a"),
        ([b"a\\..\\..\\b"], "show/a....b"),
        ([b"a/../b"], "show/a..b"),
        ([b"evil\xe2\x80\xaevkm.exe"], "show/evilvkm.exe"),
        ([b"bad\xffbyte\x01"], "show/bad_byte_"),
        ([b"x" * 300 + b".mkv"], "show/" + "x" * 240 + ".mkv"),
    ],
)
def test_a_listed_path_is_reported_as_libtorrent_writes_it(
    listed: list[bytes], written: str
) -> None:
    data = v1_torrent(b"show", [listed])
    assert torrent_files(data) == [(written, 1)] == libtorrent_files(data)


@pytest.mark.parametrize("name", [b"..", b".", b"/"])
def test_a_name_of_nothing_usable_is_the_info_hash_as_in_libtorrent(name: bytes) -> None:
    data = v1_torrent(name, [[b"a"]])
    info_hash = str(lt.torrent_info(data).info_hashes().v1)
    assert torrent_files(data) == [(f"{info_hash}/a", 1)] == libtorrent_files(data)


HOSTILE = [
    b"..",
    b".",
    b"",
    b"/",
    b"\\",
    b"a/b",
    b"/abs",
    b"a\\..\\b",
    b"...",
    b". .",
    b"\x00",
    b"\x1f",
    b"\x7f",
    "\u0085".encode(),
    "\u00a0".encode(),
    "\u200b".encode(),
    "\u202e".encode(),
    "\u2066".encode(),
    "\ufeff".encode(),
    b"\xc3",
    b"\xff",
    b"\xed\xa0\x80",  # a surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xc0\xaf",  # an overlong "/"
    b"\xf8\x88\x80\x80\x80",
    b"_____padding_file_1",
    "é".encode(),
    "日本".encode(),
    "🎬".encode(),
    b"x.mkv",
    b"con",
    b" ",
]
ELEMENT = st.one_of(
    st.sampled_from(HOSTILE),
    st.lists(st.sampled_from([*HOSTILE, b"a", b"."]), min_size=1, max_size=6).map(b"".join),
    st.binary(max_size=12),
    st.text(max_size=8).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda count, fill, tail: fill * count + tail,
        st.integers(225, 260),
        st.sampled_from([b"a", "é".encode(), b".", b"\xff", "\u200b".encode()]),
        st.sampled_from(
            [b"", b".mkv", b".x", b".toolongext", b"/.mkv", b"..", b"\xe2\x80\xae.srt"]
        ),
    ),
)
PATHS = st.lists(st.lists(ELEMENT, min_size=1, max_size=4), min_size=1, max_size=5)
HOSTILE_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def assert_as_libtorrent_writes(data: bytes) -> None:
    expected = libtorrent_files(data)
    if expected is None:
        return  # libtorrent refuses it: the worker will too
    files = torrent_files(data)
    assert files == expected
    for path, _ in files:
        parts = PurePosixPath(path).parts
        assert not PurePosixPath(path).is_absolute() and ".." not in parts and "." not in parts


@HOSTILE_SETTINGS
@given(name=ELEMENT, paths=PATHS, utf8=st.booleans())
def test_the_paths_of_a_hostile_multi_file_torrent_are_libtorrents(
    name: bytes, paths: list[list[bytes]], utf8: bool
) -> None:
    assert_as_libtorrent_writes(v1_torrent(name, paths, utf8=utf8))


@HOSTILE_SETTINGS
@given(name=ELEMENT)
def test_the_path_of_a_hostile_single_file_torrent_is_libtorrents(name: bytes) -> None:
    info = {b"name": name, b"piece length": 16384, b"length": 5, b"pieces": b"\1" * 20}
    assert_as_libtorrent_writes(bencode({b"info": info}))


def file_tree(paths: list[list[bytes]]) -> dict[bytes, Any]:
    """A v2 file tree of `paths`, leaving out those a tree cannot hold (a file that is also a
    folder, an empty name)."""
    tree: dict[bytes, Any] = {}
    for index, path in enumerate(paths):
        node = tree
        for element in path[:-1]:
            child = node.setdefault(element, {}) if element else None
            if child is None or b"" in child:
                break
            node = child
        else:
            if path[-1] and path[-1] not in node:
                node[path[-1]] = {b"": {b"length": 1 + index, b"pieces root": b"\1" * 32}}
    return tree


@HOSTILE_SETTINGS
@given(name=ELEMENT, paths=PATHS)
def test_the_paths_of_a_hostile_v2_torrent_are_libtorrents(
    name: bytes, paths: list[list[bytes]]
) -> None:
    tree = file_tree(paths)
    info = {b"name": name, b"piece length": 16384, b"meta version": 2, b"file tree": tree}
    assert_as_libtorrent_writes(bencode({b"info": info}))


def hostile_payload(root: Path) -> tuple[Payload, dict[str, list[bytes]]]:
    """A real payload whose .torrent lists paths out of its folder: the files are where
    libtorrent writes them (so a seeder finds them), the .torrent lists the hostile paths."""
    hostile = {
        "_/_/_/etc/cron.d/x": [b"..", b"..", b"..", b"etc", b"cron.d", b"x"],
        "etc/passwd": [b"/etc", b"passwd"],
        "ok.mkv": [b"ok.mkv"],
    }
    sizes = {"_/_/_/etc/cron.d/x": 20_000, "etc/passwd": 3_000, "ok.mkv": 60_000}
    made = make_payload(root, "show", sizes, flags=lt.create_torrent.v1_only)
    decoded = bdecode(made.torrent)
    assert isinstance(decoded, dict)
    for entry in decoded[b"info"][b"files"]:
        entry[b"path"] = hostile["/".join(part.decode() for part in entry[b"path"])]
    torrent = bencode(decoded)
    info_hash = str(lt.torrent_info(torrent).info_hashes().v1)
    return Payload(root, "show", torrent, info_hash, made.file_hashes), hostile


def test_a_completion_reports_the_paths_libtorrent_wrote_never_the_listed_ones(
    fresh: Served, tmp_path: Path
) -> None:
    payload, _ = hostile_payload(tmp_path / "seed")
    with seeding(payload) as seeder, subscribe(fresh) as events, fresh.client() as client:
        client.call("add", torrent_b64=b64(payload.torrent), task_id="hostile", peers=[seeder.peer])
        completed = wait_event(events, "download.completed", "hostile")
        info = client.call("get", task_id="hostile")
    save_path = Path(completed["save_path"])
    reported = sorted(file["path"] for file in completed["files"])
    assert reported == sorted(payload.file_hashes)  # show/_/_/_/etc/cron.d/x, show/etc/passwd
    assert sorted(file["path"] for file in info["files"]) == reported
    for path in reported:
        assert ".." not in PurePosixPath(path).parts
        written = (save_path / path).read_bytes()
        assert hashlib.sha256(written).hexdigest() == payload.file_hashes[path]
    assert not (save_path / "show/../../../etc/cron.d/x").exists()
