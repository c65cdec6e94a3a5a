"""The state schema, info hashes without libtorrent, migrations, and load/save round trips."""

from __future__ import annotations

import contextlib
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libtorrent as lt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import CorruptState, DlkeeperError, InvalidMagnet, InvalidTorrent, StateTooNew
from actors.messages.persistence import (
    AckRecord,
    AddRecord,
    RecordChanges,
    RemoveRecord,
    RetryRecord,
    StateMutation,
    UpdateRecord,
)
from actors.metainfo import magnet_info_hash, torrent_files, torrent_info_hash
from actors.persistence import apply_mutation
from actors.state import (
    CURRENT_VERSION,
    MIGRATIONS,
    DownloadRecord,
    DownloadStatus,
    MigrationContext,
    decode_state,
    encode_state,
)
from actors.statefile import LoadReport, LoadSource, StateStore
from tests.records import make_record
from tests.torrents import make_payload

CONTEXT = MigrationContext(download_path=Path("/srv/media/downloads"))


# --- info hashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags", [0, lt.create_torrent.v1_only, lt.create_torrent.v2_only], ids=["hybrid", "v1", "v2"]
)
def test_torrent_info_hash_matches_libtorrent(tmp_path: Path, flags: int) -> None:
    payload = make_payload(tmp_path, "movie", {"a.mkv": 70_000, "subs/a.srt": 900}, flags=flags)
    assert torrent_info_hash(payload.torrent) == payload.info_hash


@pytest.mark.parametrize(
    "flags", [0, lt.create_torrent.v1_only, lt.create_torrent.v2_only], ids=["hybrid", "v1", "v2"]
)
@pytest.mark.parametrize(
    "files",
    [{"a.mkv": 70_000, "sub/b.srt": 900}, {"one.bin": 5000}, {"x/y/z.bin": 10, "w.bin": 40_000}],
    ids=["two", "one", "nested"],
)
def test_torrent_files_match_libtorrents_list_without_padding(
    tmp_path: Path, flags: int, files: dict[str, int]
) -> None:
    payload = make_payload(tmp_path, "pack", files, flags=flags)
    layout = lt.torrent_info(payload.torrent).layout()
    expected = [
        (layout.file_path(i), layout.file_size(i))
        for i in range(layout.num_files())
        if not layout.file_flags(i) & lt.file_storage.flag_pad_file
    ]
    assert torrent_files(payload.torrent) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"d4:infoi1ee",
        b"d4:name3:abce",
        b"d4:infod4:name1:xee",
        b"d4:info",
        b"li1e",
    ],
)
def test_torrent_info_hash_rejects_what_is_not_a_torrent(data: bytes) -> None:
    with pytest.raises(InvalidTorrent):
        torrent_info_hash(data)


@given(st.binary(max_size=200))
def test_torrent_info_hash_raises_only_invalid_torrent_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(InvalidTorrent):
        torrent_info_hash(data)


def test_magnet_info_hash_reads_hex_base32_and_v2() -> None:
    hex_hash = "c9e15763f722f23e98a29decdfae341b98d53056"
    assert magnet_info_hash(f"magnet:?xt=urn:btih:{hex_hash.upper()}&dn=x") == hex_hash
    assert magnet_info_hash("magnet:?xt=urn:btih:ZHQVOY7XELZD5GFCTXWN7LRUDOMNKMCW") == hex_hash
    v2 = "ab" * 32
    assert magnet_info_hash(f"magnet:?xt=urn:btmh:1220{v2}") == v2


@pytest.mark.parametrize(
    "uri", ["http://x", "magnet:?dn=no-hash", "magnet:?xt=urn:btih:123", "magnet:?xt=urn:btmh:99"]
)
def test_magnet_info_hash_rejects_bad_links(uri: str) -> None:
    with pytest.raises(InvalidMagnet):
        magnet_info_hash(uri)


# --- the schema ----------------------------------------------------------------------------------


def test_record_times_are_kept_in_utc_and_written_with_z() -> None:
    record = make_record("a").model_copy()
    local = DownloadRecord.model_validate(
        {**record.model_dump(), "created_at": "2026-11-24T23:00:00+01:00"}
    )
    assert local.created_at == datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
    assert b'"created_at":"2026-11-24T22:00:00Z"' in local.to_json()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_id", "has space"),
        ("task_id", "x" * 65),
        ("created_at", "2026-11-24T22:00:00"),  # naive times are refused in v1
        ("status", "checking"),  # a live status, never persisted
        ("progress", 1.5),
        ("file_priorities", [8]),
        ("magnet_link", None),  # and no torrent_file_path either: nothing to resume from
    ],
)
def test_record_rejects_invalid_fields(field: str, value: object) -> None:
    data = {**make_record("a").model_dump(), field: value}
    with pytest.raises(ValueError, match=field if field != "magnet_link" else "magnet_link or"):
        DownloadRecord.model_validate(data)


def test_state_file_matches_the_contracts_shape() -> None:
    raw = encode_state({"a": make_record("a", progress=0.42)})
    data = orjson.loads(raw)
    assert data["version"] == 1
    entry = data["downloads"]["a"]
    assert set(entry) == {
        "task_id", "name", "info_hash", "created_at", "status", "magnet_link",
        "torrent_file_path", "save_path", "file_priorities", "peers", "torrent_metadata",
        "validation_metadata", "progress", "completed_at", "error",
    }  # fmt: skip
    assert entry["created_at"] == "2026-11-24T22:00:00Z"
    assert entry["progress"] == 0.42


def test_state_keyed_by_another_task_id_is_corrupt() -> None:
    raw = encode_state({"a": make_record("a")}).replace(b'"a":{', b'"b":{', 1)
    with pytest.raises(CorruptState, match="holds task_id"):
        decode_state(raw, Path("x"), CONTEXT)


def test_state_from_a_newer_version_is_refused() -> None:
    raw = orjson.dumps({"version": CURRENT_VERSION + 1, "downloads": {}})
    with pytest.raises(StateTooNew, match="schema version 2"):
        decode_state(raw, Path("x"), CONTEXT)


# --- migration from the original design's file (v0) ----------------------------------------------


def write_v0_fixture(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    """A v0 file exactly as the original design wrote it; returns its path, data and the
    info hash of its .torrent download."""
    payload = make_payload(tmp_path / "tmp", "Old Movie", {"old.mkv": 50_000})
    torrent_path = tmp_path / "tmp" / "tmpab12cd.torrent"  # the seed kept them in /tmp
    torrent_path.write_bytes(payload.torrent)
    magnet_hash = "c9e15763f722f23e98a29decdfae341b98d53056"
    data: dict[str, Any] = {
        "movie-1": {
            "task_id": "movie-1",
            "name": "Old Movie",
            "created_at": "2026-11-01T20:15:00.123456",
            "status": "downloading",
            "magnet_link": None,
            "torrent_file_path": str(torrent_path),
            "file_priorities": [1],
            "torrent_metadata": {"title": "Old Movie", "year": 1987, "tmdb_id": 42},
            "validation_metadata": {"expected_size": 50_000, "quality": "1080p"},
        },
        "show_2": {
            "task_id": "show_2",
            "name": "A Show S01",
            "created_at": "2026-11-02T08:00:00",
            "status": "paused",
            "magnet_link": f"magnet:?xt=urn:btih:{magnet_hash}&dn=A+Show",
            "torrent_file_path": None,
            "file_priorities": [1, 0, 1],
            "torrent_metadata": {"title": "A Show"},
            "validation_metadata": {},
        },
        "lost-3": {
            "task_id": "lost-3",
            "name": "Torrent gone from /tmp",
            "created_at": "2026-11-03T09:30:00",
            "status": "queued",
            "magnet_link": None,
            "torrent_file_path": str(tmp_path / "tmp" / "vanished.torrent"),
            "file_priorities": [],
            "torrent_metadata": {},
            "validation_metadata": {"note": "kept"},
        },
    }
    state = tmp_path / "library" / "data" / "downloads.json"
    state.parent.mkdir(parents=True)
    state.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return state, data, payload.info_hash


def test_v0_file_is_migrated_to_v1_with_nothing_lost(tmp_path: Path) -> None:
    state, v0, torrent_hash = write_v0_fixture(tmp_path)
    original = state.read_bytes()
    store = StateStore(state.parent, MigrationContext(download_path=tmp_path / "downloads"))
    store.acquire_lock()
    try:
        downloads, report = store.load()
    finally:
        store.release_lock()

    assert report.source is LoadSource.FILE
    assert report.migrated_from == 0
    # The old file is kept, byte for byte, next to the new one.
    assert report.version_backup is not None
    assert report.version_backup.parent == state.parent
    assert report.version_backup.name.startswith("downloads.json.v0-")
    assert report.version_backup.read_bytes() == original
    # The file on disk is now version 1 and loads to the same downloads.
    rewritten = orjson.loads(state.read_bytes())
    assert rewritten["version"] == 1
    assert decode_state(state.read_bytes(), state, CONTEXT).downloads.keys() == v0.keys()

    for task_id, old in v0.items():
        new = downloads[task_id]
        for field in ("task_id", "name", "magnet_link", "torrent_file_path"):
            assert getattr(new, field) == old[field]
        assert new.status == old["status"]
        assert list(new.file_priorities) == old["file_priorities"]
        assert new.torrent_metadata == old["torrent_metadata"]
        assert new.validation_metadata == old["validation_metadata"]
        naive = datetime.fromisoformat(old["created_at"])
        assert new.created_at == naive.astimezone(UTC)  # local time, as the seed wrote it
        assert new.save_path == str(tmp_path / "downloads")
        assert new.progress == 0.0
        assert new.peers == ()
    assert downloads["movie-1"].info_hash == torrent_hash
    assert downloads["show_2"].info_hash == "c9e15763f722f23e98a29decdfae341b98d53056"
    assert downloads["lost-3"].info_hash is None  # left for the session to fill


def test_v0_entry_with_unknown_fields_migrates_and_the_backup_keeps_them(tmp_path: Path) -> None:
    state, v0, _ = write_v0_fixture(tmp_path)
    v0["show_2"]["legacy_flag"] = True
    state.write_bytes(orjson.dumps(v0))
    decoded = decode_state(state.read_bytes(), state, CONTEXT)
    assert decoded.from_version == 0
    assert set(decoded.downloads) == set(v0)


def test_migrations_chain_from_every_old_version_to_the_current_one() -> None:
    assert sorted(MIGRATIONS) == list(range(CURRENT_VERSION))


# --- hypothesis: round trips, and any bytes as a state file --------------------------------------

TASK_IDS = st.sampled_from(["a", "b", "c-1", "D_2", "e" * 64])
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def records(draw: st.DrawFn) -> DownloadRecord:
    task_id = draw(TASK_IDS)
    magnet = draw(st.booleans())
    return DownloadRecord(
        task_id=task_id,
        name=draw(st.text(max_size=20)),
        info_hash=draw(st.none() | st.from_regex(r"[0-9a-f]{40}", fullmatch=True)),
        created_at=draw(st.datetimes(timezones=st.just(UTC))),
        status=draw(st.sampled_from(DownloadStatus)),
        magnet_link=f"magnet:?xt=urn:btih:{'ab' * 20}" if magnet else None,
        torrent_file_path=None if magnet else f"/srv/torrents/{task_id}.torrent",
        save_path=draw(st.text(min_size=1, max_size=30)),
        file_priorities=tuple(draw(st.lists(st.integers(0, 7), max_size=5))),
        peers=tuple(draw(st.lists(st.sampled_from(["127.0.0.1:6881", "[::1]:1"]), max_size=2))),
        torrent_metadata=draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3)),
        validation_metadata=draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3)),
        progress=draw(st.floats(0, 1)),
        completed_at=draw(st.none() | st.datetimes(timezones=st.just(UTC))),
        error=draw(st.none() | st.text(max_size=20)),
    )


CHANGES = st.builds(
    RecordChanges,
    status=st.sampled_from(DownloadStatus),
    progress=st.floats(0, 1),
    file_priorities=st.lists(st.integers(0, 7), max_size=4).map(tuple),
    peers=st.lists(st.just("127.0.0.1:1"), max_size=2).map(tuple),
    error=st.none() | st.text(max_size=10),
)
MUTATIONS: st.SearchStrategy[StateMutation] = st.one_of(
    st.builds(AddRecord, record=records()),
    st.builds(UpdateRecord, task_id=TASK_IDS, changes=CHANGES),
    st.builds(RemoveRecord, task_id=TASK_IDS),
    st.builds(AckRecord, task_id=TASK_IDS),
    st.builds(RetryRecord, task_id=TASK_IDS),
)


def load_fresh(directory: Path) -> tuple[dict[str, DownloadRecord], LoadReport]:
    """Loads `directory` as a daemon starting there would: a new store, lock, load, unlock."""
    store = StateStore(directory, CONTEXT)
    store.acquire_lock()
    try:
        return store.load()
    finally:
        store.release_lock()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MUTATIONS, max_size=25))
def test_any_sequence_of_mutations_saved_and_loaded_gives_back_the_same_state(
    mutations: list[StateMutation],
) -> None:
    expected: dict[str, DownloadRecord] = {}
    writes = 0
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        store = StateStore(directory, CONTEXT)
        store.acquire_lock()
        try:
            for mutation in mutations:
                try:
                    apply_mutation(expected, mutation)
                except DlkeeperError:
                    continue  # refused: nothing changed, nothing to save
                store.write(expected)
                writes += 1
        finally:
            store.release_lock()
        reloaded, report = load_fresh(directory)
    assert reloaded == expected
    assert report.source is (LoadSource.FILE if writes else LoadSource.NEW)


def valid_state_bytes() -> bytes:
    return encode_state({"a": make_record("a"), "b": make_record("b", DownloadStatus.PAUSED)})


STATE_BYTES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(orjson.dumps),
    st.fixed_dictionaries({"version": JSON_LEAVES, "downloads": JSON_VALUES}).map(orjson.dumps),
    # A valid file cut short or with one byte changed: what a torn write would leave.
    st.integers(0, len(valid_state_bytes()) - 1).map(lambda n: valid_state_bytes()[:n]),
    st.tuples(st.integers(0, len(valid_state_bytes()) - 1), st.integers(0, 255)).map(
        lambda at: valid_state_bytes()[: at[0]] + bytes([at[1]]) + valid_state_bytes()[at[0] + 1 :]
    ),
)


@settings(max_examples=150, deadline=None)
@given(STATE_BYTES)
def test_any_bytes_as_a_state_file_load_or_are_quarantined_never_lost(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        (directory / "downloads.json").write_bytes(raw)
        try:
            downloads, report = load_fresh(directory)
        except StateTooNew:
            # Refused, not overwritten: the file is exactly as it was.
            assert (directory / "downloads.json").read_bytes() == raw
            return
        if report.quarantined:
            (kept,) = report.quarantined
            assert kept.name.startswith("downloads.json.corrupt-")
            assert kept.read_bytes() == raw
            assert report.source is LoadSource.EMPTY
            assert downloads == {}
        else:
            assert report.source is LoadSource.FILE
            assert downloads == decode_state(raw, directory, CONTEXT).downloads
