"""The message API's get, list, pause, resume, cancel, set_files, ack and stats."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.api import (
    DOWNLOAD_INFO_KEYS,
    Served,
    add_started,
    add_torrent,
    code_of,
    files_under,
    fixture_api,  # noqa: F401 (a fixture)
    fixture_fresh,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    has_files,
    is_utc_timestamp,
    make_library,
    new_id,
    new_payload,
    payload_files,
    seeding_now,
    wait_status,
    wait_until,
)
from tests.daemons import RawClient, running_daemon


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("get", {}),
        ("pause", {}),
        ("resume", {}),
        ("cancel", {}),
        ("cancel", {"delete_files": True}),
        ("set_files", {"file_priorities": [1]}),
        ("ack", {}),
        ("retry", {}),
    ],
)
def test_an_unknown_task_id_is_not_found(api: RawClient, op: str, params: dict[str, Any]) -> None:
    assert code_of(api.request(op, task_id=new_id("unknown"), **params)) == "not_found"


def test_get_of_a_fresh_download_shows_every_field(api: RawClient, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("fresh")
    add_torrent(api, payload, task_id=task_id)
    info = api.call("get", task_id=task_id)
    assert set(info) == DOWNLOAD_INFO_KEYS
    assert info["task_id"] == task_id
    assert info["name"] == payload.name
    assert info["info_hash"] == payload.info_hash
    assert info["status"] in {"queued", "checking", "downloading"}
    assert info["progress"] == 0.0
    assert info["total_bytes"] == 136_000
    assert info["completed_at"] is None
    assert info["error"] is None
    assert is_utc_timestamp(info["created_at"])
    assert [f["priority"] for f in info["files"]] == [4, 4]


def test_get_of_a_magnet_without_metadata_has_no_files_yet(api: RawClient) -> None:
    task_id = new_id("no-metadata")
    magnet = f"magnet:?xt=urn:btih:{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}&dn=nobody-has-it"
    api.call("add", magnet=magnet, task_id=task_id)
    info = api.call("get", task_id=task_id)
    assert info["name"] == "nobody-has-it"
    assert info["files"] == []
    assert info["status"] in {"queued", "fetching_metadata"}


def test_list_shows_every_download_in_the_order_added(api: RawClient, tmp_path: Path) -> None:
    task_ids = [new_id("listed") for _ in range(3)]
    for task_id in task_ids:
        add_torrent(api, new_payload(tmp_path), task_id=task_id)
    downloads = api.call("list")["downloads"]
    assert all(set(info) == DOWNLOAD_INFO_KEYS for info in downloads)
    listed = [info["task_id"] for info in downloads]
    assert [task_id for task_id in listed if task_id in task_ids] == task_ids
    created = [datetime.fromisoformat(info["created_at"]) for info in downloads]
    assert created == sorted(created)


def test_pause_pauses_and_resume_resumes(api: RawClient, shared: Served, tmp_path: Path) -> None:
    task_id = new_id("toggle")
    add_started(api, shared.library, new_payload(tmp_path), task_id)
    paused = api.call("pause", task_id=task_id)
    assert set(paused) == DOWNLOAD_INFO_KEYS
    assert paused["status"] == "paused"
    assert api.call("get", task_id=task_id)["status"] == "paused"
    resumed = api.call("resume", task_id=task_id)
    assert resumed["status"] != "paused"
    assert api.call("get", task_id=task_id)["status"] != "paused"


def test_pause_of_a_paused_download_and_resume_of_a_running_one_change_nothing(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("idempotent")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, paused=True)
    assert api.call("pause", task_id=task_id)["status"] == "paused"
    assert api.call("resume", task_id=task_id)["status"] != "paused"
    assert api.call("resume", task_id=task_id)["status"] != "paused"
    assert shared.library.state()[task_id]["status"] in {"queued", "downloading"}


def test_set_files_changes_the_priorities(api: RawClient, tmp_path: Path) -> None:
    task_id = new_id("set-files")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    info = api.call("set_files", task_id=task_id, file_priorities=[0, 7])
    assert set(info) == DOWNLOAD_INFO_KEYS
    assert [f["priority"] for f in info["files"]] == [0, 7]
    assert [f["priority"] for f in api.call("get", task_id=task_id)["files"]] == [0, 7]


def test_set_files_of_the_wrong_length_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("set-wrong")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, file_priorities=[1, 2])
    for wrong in ([3], [3, 3, 3], []):
        reply = api.request("set_files", task_id=task_id, file_priorities=wrong)
        assert code_of(reply) == "bad_request", wrong
    assert shared.library.state()[task_id]["file_priorities"] == [1, 2]


def test_set_files_of_a_magnet_is_checked_once_its_metadata_is_known(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path, {"a.bin": 2_000_000, "sub/b.bin": 40_000})
    task_id = new_id("magnet-files")
    with seeding_now(payload, upload_rate_limit=20_000) as seeder:  # still downloading meanwhile
        api.call("add", magnet=seeder.magnet(payload), task_id=task_id)
        wait_until(lambda: api.call("get", task_id=task_id)["files"], "the magnet's metadata")
        reply = api.request("set_files", task_id=task_id, file_priorities=[1, 1, 1])
        assert code_of(reply) == "bad_request"
        info = api.call("set_files", task_id=task_id, file_priorities=[1, 0])
        assert [f["priority"] for f in info["files"]] == [1, 0]
        api.call("cancel", task_id=task_id)


def test_cancel_removes_the_download(api: RawClient, shared: Served, tmp_path: Path) -> None:
    task_id = new_id("cancelled")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    assert api.call("cancel", task_id=task_id) == {}
    assert code_of(api.request("get", task_id=task_id)) == "not_found"
    assert task_id not in [info["task_id"] for info in api.call("list")["downloads"]]
    assert not (shared.library.torrents / f"{task_id}.torrent").exists()


def test_cancel_with_delete_files_deletes_the_downloaded_files(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("deleted")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        wait_status(api, task_id, "completed")
    downloaded = shared.library.downloads / payload.name
    assert has_files(downloaded)
    assert api.call("cancel", task_id=task_id, delete_files=True) == {}
    wait_until(lambda: not has_files(downloaded), "the downloaded files to be deleted")


def test_cancel_without_delete_files_keeps_the_downloaded_files(
    fresh: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    with fresh.client() as client:
        with seeding_now(payload) as seeder:
            add_torrent(client, payload, task_id="kept", peers=[seeder.peer])
            wait_status(client, "kept", "completed")
        assert client.call("cancel", task_id="kept") == {}
    assert fresh.daemon.stop() == 0  # nothing can delete them after this
    assert payload_files(payload) == files_under(fresh.library.downloads / payload.name)
    assert fresh.library.state() == {}


def test_ack_of_a_completed_download_removes_it_and_keeps_its_files(
    fresh: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    with fresh.client() as client:
        with seeding_now(payload) as seeder:
            add_torrent(client, payload, task_id="done", peers=[seeder.peer])
            wait_status(client, "done", "completed")
        assert client.call("ack", task_id="done") == {}
        assert code_of(client.request("get", task_id="done")) == "not_found"
        assert client.call("list") == {"downloads": []}
    assert fresh.daemon.stop() == 0
    assert payload_files(payload) == files_under(fresh.library.downloads / payload.name)
    assert fresh.library.state() == {}


@pytest.mark.parametrize("paused", [False, True])
def test_ack_of_a_download_not_finished_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path, paused: bool
) -> None:
    task_id = new_id("unfinished")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, paused=paused)
    assert code_of(api.request("ack", task_id=task_id)) == "bad_request"
    assert task_id in shared.library.state()


def test_pause_of_a_completed_download_is_bad_request(api: RawClient, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("finished")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        wait_status(api, task_id, "completed")
    assert code_of(api.request("pause", task_id=task_id)) == "bad_request"
    assert api.call("get", task_id=task_id)["status"] == "completed"


def test_stats_counts_downloads_by_status(fresh: Served, tmp_path: Path) -> None:
    with fresh.client() as client:
        assert client.call("stats")["downloads"] == {}
        add_torrent(client, new_payload(tmp_path), task_id="one", paused=True)
        add_torrent(client, new_payload(tmp_path), task_id="two", paused=True)
        add_torrent(client, new_payload(tmp_path), task_id="three")
        stats = client.call("stats")
    assert set(stats) == {
        "downloads",
        "resumed_at_start",
        "resume_failures",
        "worker_restarts",
        "uptime",
        "problems",
        "free_bytes",
    }
    assert stats["downloads"]["paused"] == 2
    assert sum(stats["downloads"].values()) == 3
    assert stats["resumed_at_start"] == 0
    assert stats["resume_failures"] == 0
    assert stats["worker_restarts"] == 0


def test_stats_uptime_is_the_seconds_since_the_daemon_started(fresh: Served) -> None:
    with fresh.client() as client:
        uptime = client.call("stats")["uptime"]
        assert isinstance(uptime, float)
        assert 0 <= uptime <= time.monotonic() - fresh.started

        def uptime_if_grown() -> float | None:
            value: float = client.call("stats")["uptime"]
            return value if value > uptime else None

        later = wait_until(uptime_if_grown, "uptime to grow")
    assert later <= time.monotonic() - fresh.started


def test_stats_counts_the_downloads_resumed_at_start(tmp_path: Path) -> None:
    library = make_library(tmp_path)
    with running_daemon(library.config) as daemon, daemon.client() as client:
        add_torrent(client, new_payload(tmp_path), task_id="one")
        add_torrent(client, new_payload(tmp_path), task_id="two", paused=True)
        client.close()
        assert daemon.stop() == 0
    with running_daemon(library.config) as daemon, daemon.client() as client:
        assert client.call("stats")["resumed_at_start"] == 2
