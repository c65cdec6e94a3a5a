"""The message API's durability: each change is in downloads.json when its ok arrives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.api import (
    Served,
    add_started,
    add_torrent,
    b64,
    fixture_api,  # noqa: F401 (a fixture)
    fixture_fresh,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    hang_up_and_wait,
    line,
    new_id,
    new_payload,
    seeding_now,
    wait_status,
)
from tests.daemons import RawClient


def test_add_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("durable-add")
    add_torrent(
        api,
        payload,
        task_id=task_id,
        name="Durable",
        file_priorities=[1, 0],
        peers=["127.0.0.1:1"],
        torrent_metadata={"k": "v"},
        validation_metadata={"n": 1},
    )
    entry = shared.library.state()[task_id]
    assert entry["info_hash"] == payload.info_hash
    assert entry["name"] == "Durable"
    assert entry["status"] == "queued"
    assert entry["file_priorities"] == [1, 0]
    assert entry["peers"] == ["127.0.0.1:1"]
    assert entry["torrent_metadata"] == {"k": "v"}
    assert entry["validation_metadata"] == {"n": 1}


def test_pause_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-pause")
    add_started(api, shared.library, new_payload(tmp_path), task_id)
    api.call("pause", task_id=task_id)
    assert shared.library.state()[task_id]["status"] == "paused"


def test_a_pause_right_after_add_is_not_undone_when_the_download_starts(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_ids = [new_id("pause-race") for _ in range(10)]
    for task_id in task_ids:
        add_torrent(api, new_payload(tmp_path), task_id=task_id)
        api.call("pause", task_id=task_id)
    # Started after them: once the daemon saved it as started, it has seen them start too.
    add_started(api, shared.library, new_payload(tmp_path), new_id("marker"))
    state = shared.library.state()
    assert {task_id: state[task_id]["status"] for task_id in task_ids} == dict.fromkeys(
        task_ids, "paused"
    )
    assert {t: api.call("get", task_id=t)["status"] for t in task_ids} == dict.fromkeys(
        task_ids, "paused"
    )


def test_resume_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-resume")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, paused=True)
    api.call("resume", task_id=task_id)
    assert shared.library.state()[task_id]["status"] in {"queued", "downloading"}


def test_cancel_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-cancel")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    api.call("cancel", task_id=task_id)
    assert task_id not in shared.library.state()


def test_set_files_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-files")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    api.call("set_files", task_id=task_id, file_priorities=[6, 2])
    assert shared.library.state()[task_id]["file_priorities"] == [6, 2]


def test_ack_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("durable-ack")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        wait_status(api, task_id, "completed")
    assert shared.library.state()[task_id]["status"] == "completed"
    api.call("ack", task_id=task_id)
    assert task_id not in shared.library.state()


def test_bad_requests_leave_the_state_file_untouched(fresh: Served, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (fresh.library.downloads / "link").symlink_to(outside)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with fresh.client() as client:
        add_torrent(client, payload, task_id="kept", paused=True)
        before = fresh.library.state_file.read_bytes()
        bad_requests: list[tuple[str, dict[str, Any]]] = [
            ("add", {"torrent_b64": b64(payload.torrent), "task_id": "copycat"}),
            ("add", {"torrent_b64": b64(b"junk"), "task_id": "junk"}),
            ("add", {"torrent_b64": "!!", "task_id": "junk"}),
            ("add", {"torrent_path": str(fifo), "task_id": "fifo"}),
            ("add", {"torrent_path": "relative", "task_id": "relative"}),
            ("add", {"magnet": "magnet:?dn=x", "task_id": "magnet"}),
            ("add", {"magnet": "magnet:?xt=urn:btih:" + "b" * 40, "task_id": "a" * 65}),
            (
                "add",
                {
                    "torrent_b64": b64(new_payload(tmp_path).torrent),
                    "save_path": str(fresh.library.downloads / "link"),
                },
            ),
            (
                "add",
                {
                    "torrent_b64": b64(new_payload(tmp_path).torrent),
                    "file_priorities": [1],
                },
            ),
            ("pause", {"task_id": "missing"}),
            ("resume", {"task_id": "missing"}),
            ("cancel", {"task_id": "missing", "delete_files": True}),
            ("set_files", {"task_id": "kept", "file_priorities": [1, 1, 1]}),
            ("set_files", {"task_id": "kept", "file_priorities": [9, 9]}),
            ("ack", {"task_id": "kept"}),
            ("cancel", {"task_id": "kept", "delete_files": "yes"}),
            ("frobnicate", {"task_id": "kept"}),
        ]
        bad_lines = [b"garbage", b"[1]", b'{"op": 1}', b'{"id": true, "op": "add"}']
        bad_lines += [line({"op": op, **params}).rstrip() for op, params in bad_requests]
        for bad_line in bad_lines:
            client.send_raw(bad_line + b"\n")
            assert client.read_reply()["ok"] is False, bad_line
        with fresh.client() as cut_off:  # and an add that never got its newline
            cut_off.send_raw(line({"op": "add", "magnet": "magnet:?xt=urn:btih:" + "c" * 40})[:-1])
            assert hang_up_and_wait(cut_off) == b""
    assert fresh.library.state_file.read_bytes() == before
