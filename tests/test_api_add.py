"""The message API's add: each source, each parameter, each refusal."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from actors.metainfo import torrent_files, torrent_info_hash
from tests.api import (
    COMPLETED_EVENT_KEYS,
    DOWNLOAD_INFO_KEYS,
    MiB,
    Served,
    add_torrent,
    b64,
    code_of,
    error_of,
    files_under,
    fixture_api,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    is_utc_timestamp,
    new_id,
    new_payload,
    payload_files,
    seeding_now,
    subscribe,
    wait_event,
    wait_status,
    wait_until,
)
from tests.daemons import RawClient


def test_add_by_torrent_b64_with_peers_downloads_to_completion(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("b64")
    with seeding_now(payload) as seeder:
        result = add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        assert result == {"task_id": task_id, "info_hash": payload.info_hash, "status": "queued"}
        info = wait_status(api, task_id, "completed")
    assert set(info) == DOWNLOAD_INFO_KEYS
    assert info["progress"] == 1.0
    assert info["info_hash"] == payload.info_hash
    assert info["total_bytes"] == info["downloaded_bytes"] == 136_000
    assert {(f["path"], f["size"]) for f in info["files"]} == {
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    }
    assert is_utc_timestamp(info["completed_at"])
    assert payload_files(payload) == files_under(shared.library.downloads / payload.name)


def test_add_by_torrent_path_downloads_that_torrent_to_completion(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    path = tmp_path / "given.torrent"
    path.write_bytes(payload.torrent)
    task_id = new_id("path")
    with seeding_now(payload) as seeder:
        result = api.call("add", torrent_path=str(path), task_id=task_id, peers=[seeder.peer])
        assert result == {"task_id": task_id, "info_hash": payload.info_hash, "status": "queued"}
        info = wait_status(api, task_id, "completed")
    assert [(f["path"], f["size"]) for f in info["files"]] == [
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    ]
    assert payload_files(payload) == files_under(shared.library.downloads / payload.name)


def test_add_by_magnet_fetches_metadata_and_downloads_to_completion(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("magnet")
    with seeding_now(payload) as seeder:
        result = api.call("add", magnet=seeder.magnet(payload), task_id=task_id)
        assert result == {"task_id": task_id, "info_hash": payload.info_hash, "status": "queued"}
        info = wait_status(api, task_id, "completed")
    assert info["name"] == payload.name  # the magnet's dn
    assert {(f["path"], f["size"]) for f in info["files"]} == {
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    }
    assert payload_files(payload) == files_under(shared.library.downloads / payload.name)


def test_add_without_task_id_makes_one(api: RawClient, shared: Served, tmp_path: Path) -> None:
    result = add_torrent(api, new_payload(tmp_path))
    assert isinstance(result["task_id"], str)
    assert result["task_id"]
    assert api.call("get", task_id=result["task_id"])["task_id"] == result["task_id"]
    assert result["task_id"] in shared.library.state()


@pytest.mark.parametrize("source", ["torrent_b64", "torrent_path"])
def test_add_keeps_a_copy_of_the_torrent_before_replying(
    api: RawClient, shared: Served, tmp_path: Path, source: str
) -> None:
    payload = new_payload(tmp_path)
    given = tmp_path / "given.torrent"
    given.write_bytes(payload.torrent)
    task_id = new_id("copy")
    value = b64(payload.torrent) if source == "torrent_b64" else str(given)
    api.call("add", task_id=task_id, **{source: value})
    copy = shared.library.torrents / f"{task_id}.torrent"
    assert copy.read_bytes() == payload.torrent
    assert shared.library.state()[task_id]["torrent_file_path"] == str(copy)


def test_a_magnet_keeps_a_copy_of_the_torrent_once_metadata_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("magnet-copy")
    copy = shared.library.torrents / f"{task_id}.torrent"
    with seeding_now(payload) as seeder:
        api.call("add", magnet=seeder.magnet(payload), task_id=task_id)
        wait_until(
            lambda: shared.library.state()[task_id]["torrent_file_path"] == str(copy),
            "the .torrent copy to be recorded",
        )
    assert torrent_info_hash(copy.read_bytes()) == payload.info_hash
    assert torrent_files(copy.read_bytes()) == [
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    ]


def test_add_with_a_name_shows_that_name(api: RawClient, tmp_path: Path) -> None:
    task_id = new_id("named")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, name="Big Buck Bunny (2008)")
    assert api.call("get", task_id=task_id)["name"] == "Big Buck Bunny (2008)"


def test_add_with_a_save_path_inside_download_path_downloads_there(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("saved")
    save_path = shared.library.downloads / "movies" / task_id
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, save_path=str(save_path), peers=[seeder.peer])
        info = wait_status(api, task_id, "completed")
    assert info["save_path"] == str(save_path)
    assert payload_files(payload) == files_under(save_path / payload.name)


def test_add_with_file_priorities_downloads_only_the_wanted_files(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("priorities")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, file_priorities=[7, 0], peers=[seeder.peer])
        info = wait_status(api, task_id, "completed")
    assert [(f["size"], f["priority"]) for f in info["files"]] == [(96_000, 7), (40_000, 0)]
    assert shared.library.state()[task_id]["file_priorities"] == [7, 0]
    wanted = shared.library.downloads / payload.name / "a.bin"
    assert wanted.read_bytes() == (payload.root / payload.name / "a.bin").read_bytes()


def test_add_paused_stays_paused_and_fetches_nothing(api: RawClient, tmp_path: Path) -> None:
    paused, running = new_payload(tmp_path), new_payload(tmp_path)
    paused_id, running_id = new_id("paused"), new_id("running")
    with seeding_now(paused, running) as seeder:
        result = add_torrent(api, paused, task_id=paused_id, paused=True, peers=[seeder.peer])
        assert result["status"] == "paused"
        add_torrent(api, running, task_id=running_id, peers=[seeder.peer])
        wait_status(api, running_id, "completed")  # the same peer had time enough
        info = api.call("get", task_id=paused_id)
    assert info["status"] == "paused"
    assert info["downloaded_bytes"] == 0


def test_add_keeps_the_peers(api: RawClient, shared: Served, tmp_path: Path) -> None:
    task_id = new_id("peers")
    peers = ["127.0.0.1:6881", "[::1]:6882", "localhost:6883"]
    add_torrent(api, new_payload(tmp_path), task_id=task_id, peers=peers)
    assert shared.library.state()[task_id]["peers"] == peers


def test_completed_event_carries_every_field_and_the_metadata_given_to_add(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("event")
    torrent_metadata = {"tmdb": 10378, "title": "Big Buck Bunny", "tags": ["a", {"b": None}]}
    validation_metadata = {"sha256": {"a.bin": "00ff"}, "min_size": 1.5}
    with subscribe(shared) as events, seeding_now(payload) as seeder:
        add_torrent(
            api,
            payload,
            task_id=task_id,
            name="Bunny",
            peers=[seeder.peer],
            torrent_metadata=torrent_metadata,
            validation_metadata=validation_metadata,
        )
        event = wait_event(events, "download.completed", task_id)
    assert set(event) == COMPLETED_EVENT_KEYS
    assert isinstance(event["seq"], int)
    assert event["name"] == "Bunny"
    assert event["info_hash"] == payload.info_hash
    assert event["save_path"] == str(shared.library.downloads.resolve())
    assert event["files"] == [
        {"path": f"{payload.name}/a.bin", "size": 96_000, "priority": 4},
        {"path": f"{payload.name}/sub/b.bin", "size": 40_000, "priority": 4},
    ]
    assert event["torrent_metadata"] == torrent_metadata
    assert event["validation_metadata"] == validation_metadata
    assert is_utc_timestamp(event["completed_at"])


def test_add_of_a_task_id_again_with_the_same_torrent_returns_the_same_download(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("retry")
    first = add_torrent(api, payload, task_id=task_id)
    again = add_torrent(api, payload, task_id=task_id)
    assert again == first
    entries = [e for e in shared.library.state().values() if e["info_hash"] == payload.info_hash]
    assert [entry["task_id"] for entry in entries] == [task_id]


def test_add_of_a_torrent_active_under_another_task_id_is_duplicate_naming_it(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    first, second = new_id("original"), new_id("copycat")
    add_torrent(api, payload, task_id=first)
    error = error_of(api.request("add", torrent_b64=b64(payload.torrent), task_id=second))
    assert error["code"] == "duplicate"
    assert error["task_id"] == first
    assert second not in shared.library.state()


def test_add_of_a_magnet_active_under_another_task_id_is_duplicate_naming_it(
    api: RawClient, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    first = new_id("original")
    add_torrent(api, payload, task_id=first)
    magnet = f"magnet:?xt=urn:btih:{payload.info_hash.upper()}"
    error = error_of(api.request("add", magnet=magnet, task_id=new_id("copycat")))
    assert error["code"] == "duplicate"
    assert error["task_id"] == first


def test_add_of_a_task_id_that_has_another_torrent_is_duplicate(
    api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("taken")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    reply = api.request("add", torrent_b64=b64(new_payload(tmp_path).torrent), task_id=task_id)
    error = error_of(reply)
    assert error["code"] == "duplicate"
    assert error["task_id"] == task_id


@pytest.mark.parametrize(
    "task_id",
    ["a" * 65, "", "has space", "a/b", "..", "tab\t", "new\nline", "end\n", "ünicode", "a.b"],
)
def test_add_with_a_task_id_outside_the_pattern_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path, task_id: str
) -> None:
    reply = api.request("add", torrent_b64=b64(new_payload(tmp_path).torrent), task_id=task_id)
    assert code_of(reply) == "bad_request"
    assert task_id not in shared.library.state()


@pytest.mark.parametrize("task_id", ["a" * 64, "A-z_0-9", "-", "_"])
def test_add_with_a_task_id_inside_the_pattern_is_taken_as_given(
    api: RawClient, tmp_path: Path, task_id: str
) -> None:
    # Unique per run of the shared daemon: the pattern's edges, made unique where they allow.
    given = task_id if len(task_id) == 64 else f"{task_id}{uuid.uuid4().hex[:8]}"
    result = add_torrent(api, new_payload(tmp_path), task_id=given)
    assert result["task_id"] == given
    api.call("cancel", task_id=given)


def test_add_with_two_sources_is_bad_request(api: RawClient, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    reply = api.request(
        "add", torrent_b64=b64(payload.torrent), magnet=f"magnet:?xt=urn:btih:{payload.info_hash}"
    )
    assert code_of(reply) == "bad_request"


def test_add_with_file_priorities_of_the_wrong_length_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("wrong-length")
    reply = api.request(
        "add",
        torrent_b64=b64(new_payload(tmp_path).torrent),
        task_id=task_id,
        file_priorities=[4, 4, 4],
    )
    assert code_of(reply) == "bad_request"
    assert task_id not in shared.library.state()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"hello, world", id="not-bencode"),
        pytest.param(b"d3:fooi1ee", id="no-info"),
        pytest.param(b"d4:infod4:name1:xee", id="no-pieces"),
        pytest.param(b"d4:infod4:name1:x6:pieces20:" + b"p" * 20 + b"e", id="truncated"),
        pytest.param(b"\0", id="zero-byte"),
    ],
)
def test_add_of_torrent_b64_that_is_no_torrent_is_invalid_torrent(
    api: RawClient, data: bytes
) -> None:
    reply = api.request("add", torrent_b64=b64(data), task_id=new_id("garbage"))
    assert code_of(reply) == "invalid_torrent"


@pytest.mark.parametrize("value", ["not base64!", "QUJD*", "QUJDRA"])
def test_add_of_torrent_b64_that_is_not_base64_is_bad_request(api: RawClient, value: str) -> None:
    assert code_of(api.request("add", torrent_b64=value)) == "bad_request"


def test_add_of_a_fifo_as_torrent_path_answers_at_once_with_invalid_torrent(
    api: RawClient, tmp_path: Path
) -> None:
    fifo = tmp_path / "nobody-writes-here.torrent"
    os.mkfifo(fifo)
    api.sock.settimeout(5.0)  # a daemon blocked in open() or read() would never answer
    assert code_of(api.request("add", torrent_path=str(fifo))) == "invalid_torrent"


def test_add_of_a_device_as_torrent_path_is_invalid_torrent(api: RawClient) -> None:
    api.sock.settimeout(5.0)  # a daemon reading /dev/zero to its end would never answer
    assert code_of(api.request("add", torrent_path="/dev/zero")) == "invalid_torrent"


def test_add_of_a_huge_file_as_torrent_path_is_invalid_torrent(
    api: RawClient, tmp_path: Path
) -> None:
    huge = tmp_path / "huge.torrent"
    with huge.open("wb") as file:
        file.truncate(8 * 1024 * MiB)  # sparse: 8 GiB that take no room
    api.sock.settimeout(10.0)
    assert code_of(api.request("add", torrent_path=str(huge))) == "invalid_torrent"


def test_add_of_a_relative_torrent_path_is_bad_request(api: RawClient) -> None:
    assert code_of(api.request("add", torrent_path="some/file.torrent")) == "bad_request"


def test_add_of_a_missing_torrent_path_is_bad_request(api: RawClient, tmp_path: Path) -> None:
    reply = api.request("add", torrent_path=str(tmp_path / "no-such.torrent"))
    assert code_of(reply) == "bad_request"


@pytest.mark.parametrize("op", [None, 5, ["ping"]], ids=["missing", "number", "list"])
def test_a_line_with_no_op_is_answered_with_id_null(api: RawClient, op: object) -> None:
    request: dict[str, object] = {"id": 77}
    if op is not None:
        request["op"] = op
    api.send_raw(json.dumps(request).encode() + b"\n")
    reply = api.read_reply()
    assert reply == {"id": None, "ok": False, "error": reply["error"]}
    assert reply["error"]["code"] == "bad_request"


def test_add_of_a_file_that_is_no_torrent_tells_nothing_of_its_content(
    api: RawClient, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"Zsecret")
    reply = api.request("add", torrent_path=str(secret))
    assert code_of(reply) == "invalid_torrent"
    assert reply["error"]["message"] == f"{secret} is not a .torrent file"


def test_many_requests_sent_without_reading_are_all_answered(api: RawClient) -> None:
    # More than a connection may have in progress: the daemon stops reading, then goes on.
    count = 1000
    api.send_raw(b"".join(b'{"id": %d, "op": "ping"}\n' % n for n in range(count)))
    replies = [api.read_reply() for _ in range(count)]
    assert sorted(reply["id"] for reply in replies) == list(range(count))
    assert all(reply["ok"] for reply in replies)


@pytest.mark.parametrize(
    "magnet",
    [
        "http://example.com/file.torrent",
        "magnet:?dn=no-topic",
        "magnet:?xt=urn:btih:tooshort",
        "magnet:?xt=urn:btih:" + "g" * 40,
        "magnet:?xt=urn:btmh:1220" + "a" * 10,
    ],
)
def test_add_of_a_bad_magnet_is_invalid_magnet(api: RawClient, magnet: str) -> None:
    assert code_of(api.request("add", magnet=magnet)) == "invalid_magnet"


@pytest.mark.parametrize(
    "escape", ["{downloads}/../outside", "{downloads}/a/../../outside", "/tmp", "/", "../up"]
)
def test_add_with_a_save_path_outside_download_path_is_path_not_allowed(
    api: RawClient, shared: Served, tmp_path: Path, escape: str
) -> None:
    task_id = new_id("escape")
    save_path = escape.format(downloads=shared.library.downloads)
    reply = api.request(
        "add", torrent_b64=b64(new_payload(tmp_path).torrent), task_id=task_id, save_path=save_path
    )
    assert code_of(reply) == "path_not_allowed"
    assert task_id not in shared.library.state()


@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_add_with_a_save_path_through_a_symlink_out_of_download_path_is_path_not_allowed(
    api: RawClient, shared: Served, tmp_path: Path, below: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = shared.library.downloads / new_id("link")
    link.symlink_to(outside)
    task_id = new_id("symlink")
    reply = api.request(
        "add",
        torrent_b64=b64(new_payload(tmp_path).torrent),
        task_id=task_id,
        save_path=str(link / below),
    )
    assert code_of(reply) == "path_not_allowed"
    assert task_id not in shared.library.state()
