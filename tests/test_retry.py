"""`retry` of a failed download (CONTRACT section 2, issue 12): against a real daemon and a real
loopback seeder. The failure is a real file error: a folder where a payload file must go
(`EISDIR`, as root too, where permissions stop no write); the fix is removing that folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.client import BadRequest, DlkeeperClient, NotFound
from tests.api import (
    Library,
    Served,
    add_torrent,
    code_of,
    fixture_fresh,  # noqa: F401 (a fixture)
    make_library,
    new_id,
    seeding_now,
    subscribe,
    wait_event,
    wait_until,
)
from tests.daemons import RawClient, running_daemon
from tests.swarm import Seeder
from tests.torrents import Payload, make_payload

PIECE = 64 * 1024
# Whole pieces each, so that no piece is shared by the two files: b.bin is written only once
# it is wanted, and a.bin's pieces are checked whole on their own.
FILES = {"a.bin": 32 * PIECE, "b.bin": 4 * PIECE}
TOTAL = sum(FILES.values())


def new_payload(directory: Path) -> Payload:
    return make_payload(directory / "seed", new_id("payload"), FILES, piece_size=PIECE)


def blocked_file(library: Library, payload: Payload) -> Path:
    """Where b.bin goes: a folder put there makes every write (and check) of it fail."""
    return library.downloads / payload.name / "b.bin"


def fail_at_check(
    client: RawClient,
    events: RawClient,
    library: Library,
    payload: Payload,
    task_id: str,
    *,
    peers: list[str],
) -> dict[str, Any]:
    """Adds `payload` with a folder where b.bin goes: its check fails (EISDIR), the download
    is failed; the folder is then removed. The download.failed event."""
    blocked = blocked_file(library, payload)
    blocked.mkdir(parents=True)
    add_torrent(client, payload, task_id=task_id, peers=peers)
    failed = wait_event(events, "download.failed", task_id)
    blocked.rmdir()
    return failed


def assert_hash_matches(library: Library, payload: Payload) -> None:
    for relative, digest in payload.file_hashes.items():
        content = (library.downloads / relative).read_bytes()
        assert hashlib.sha256(content).hexdigest() == digest, relative


def downloaded_if_at_least(client: RawClient, task_id: str, least: int) -> int | None:
    downloaded = int(client.call("get", task_id=task_id)["downloaded_bytes"])
    return downloaded if downloaded >= least else None


def uploaded(seeder: Seeder, payload: Payload) -> int:
    return int(seeder.handles[payload.info_hash].status().total_payload_upload)


def set_upload_limit(seeder: Seeder, limit: int) -> None:
    session = seeder.session
    local = session.get_peer_class(session.local_peer_class_id)
    session.set_peer_class(session.local_peer_class_id, {**local, "upload_limit": limit})


@pytest.mark.timeout(60)
def test_a_download_failed_mid_way_is_retried_to_completion_without_fetching_its_bytes_again(
    fresh: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    library = fresh.library
    task_id = new_id("mid")
    with (
        seeding_now(payload, upload_rate_limit=500_000) as seeder,
        fresh.client() as client,
        subscribe(fresh) as events,
    ):
        add_torrent(client, payload, task_id=task_id, peers=[seeder.peer], file_priorities=[1, 0])
        # The bytes on disk (verified pieces) when b.bin is made unwritable: they stay there.
        on_disk = wait_until(
            lambda: downloaded_if_at_least(client, task_id, 8 * PIECE), "a quarter of a.bin"
        )
        # b.bin made unwritable mid-download, then wanted: its first write fails.
        blocked_file(library, payload).mkdir()
        client.call("set_files", task_id=task_id, file_priorities=[1, 1])
        failed = wait_event(events, "download.failed", task_id)
        assert "Is a directory" in failed["error"], failed
        info = client.call("get", task_id=task_id)
        assert (info["status"], info["error"]) == ("failed", failed["error"])

        blocked_file(library, payload).rmdir()
        set_upload_limit(seeder, 0)
        before = uploaded(seeder, payload)
        retried = client.call("retry", task_id=task_id)
        assert retried["task_id"] == task_id
        assert retried["error"] is None
        assert retried["status"] in ("queued", "checking", "downloading"), retried
        assert library.state()[task_id]["status"] in ("queued", "downloading")
        assert library.state()[task_id]["error"] is None
        wait_event(events, "download.resumed", task_id)
        completed = wait_event(events, "download.completed", task_id)
        fetched = uploaded(seeder, payload) - before

    assert completed["save_path"] == str(library.downloads)
    assert_hash_matches(library, payload)
    # What a.bin held when it failed was checked, not fetched again (a few pieces of slack:
    # blocks in flight at the failure were lost).
    assert fetched <= TOTAL - on_disk + 4 * PIECE, (fetched, on_disk)
    assert library.state()[task_id]["status"] == "completed"
    assert library.state()[task_id]["error"] is None
    assert (library.torrents / f"{task_id}.torrent").exists()  # the copy was kept


@pytest.mark.timeout(60)
def test_a_retry_answered_ok_survives_a_kill_of_the_daemon(tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    library = make_library(tmp_path)
    task_id = new_id("kill")
    with seeding_now(payload) as seeder:
        with running_daemon(library.config) as daemon:
            served = Served(daemon, library, 0.0)
            with served.client() as client, subscribe(served) as events:
                fail_at_check(client, events, library, payload, task_id, peers=[seeder.peer])
                client.call("retry", task_id=task_id)
            daemon.kill()  # SIGKILL right after the ok
        assert library.state()[task_id]["status"] in ("queued", "downloading")
        assert library.state()[task_id]["error"] is None
        with running_daemon(library.config) as daemon:
            served = Served(daemon, library, 0.0)
            with served.client() as client, subscribe(served) as events:
                info = client.call("get", task_id=task_id)
                assert info["status"] != "failed", info
                assert info["error"] is None
                wait_event(events, "download.completed", task_id)
                assert not [e for e in events.events if e["event"] == "download.failed"]
    assert_hash_matches(library, payload)


@pytest.mark.timeout(60)
def test_a_download_failed_before_a_restart_is_retried_after_it(tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    library = make_library(tmp_path)
    task_id = new_id("restart")
    with seeding_now(payload) as seeder:
        with running_daemon(library.config) as daemon:
            served = Served(daemon, library, 0.0)
            with served.client() as client, subscribe(served) as events:
                failed = fail_at_check(
                    client, events, library, payload, task_id, peers=[seeder.peer]
                )
            assert daemon.stop() == 0
        # Not replayed (a failed download is not active): libtorrent does not have it now.
        with running_daemon(library.config) as daemon:
            served = Served(daemon, library, 0.0)
            with served.client() as client, subscribe(served) as events:
                # The subscriber gets the failure again, from the state file, before the retry.
                again = wait_event(events, "download.failed", task_id)
                assert again["error"] == failed["error"]
                assert client.call("stats")["downloads"] == {"failed": 1}
                retried = client.call("retry", task_id=task_id)
                assert (retried["status"], retried["error"]) != ("failed", failed["error"])
                assert retried["error"] is None
                wait_event(events, "download.resumed", task_id)
                # Also on the connection that was sent the failure from the state file.
                wait_event(events, "download.completed", task_id)
    assert_hash_matches(library, payload)


@pytest.mark.timeout(30)
def test_retry_of_a_download_that_is_not_failed_is_bad_request_and_changes_nothing(
    fresh: Served, tmp_path: Path
) -> None:
    small = make_payload(tmp_path / "seed", new_id("small"), {"s.bin": 40_000})
    paused = new_payload(tmp_path)
    with seeding_now(small) as seeder, fresh.client() as client, subscribe(fresh) as events:
        add_torrent(client, paused, task_id="paused", paused=True)
        add_torrent(client, small, task_id="done", peers=[seeder.peer])
        wait_event(events, "download.completed", "done")
        state = fresh.library.state_file.read_bytes()
        for task_id in ("paused", "done"):
            assert code_of(client.request("retry", task_id=task_id)) == "bad_request"
        assert code_of(client.request("retry", task_id="unknown")) == "not_found"
        assert fresh.library.state_file.read_bytes() == state
        assert client.call("get", task_id="paused")["status"] == "paused"
        assert client.call("get", task_id="done")["status"] == "completed"
        assert not [e for e in events.events if e["event"] == "download.resumed"]


@pytest.mark.timeout(30)
def test_retry_of_a_failed_download_whose_torrent_copy_is_gone_is_invalid_torrent(
    fresh: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    library = fresh.library
    with fresh.client() as client, subscribe(fresh) as events:
        failed = fail_at_check(client, events, library, payload, "gone", peers=[])
        (library.torrents / "gone.torrent").unlink()
        state = library.state_file.read_bytes()
        error = client.request("retry", task_id="gone")
        assert code_of(error) == "invalid_torrent"
        assert "gone.torrent" in error["error"]["message"]
        assert library.state_file.read_bytes() == state
        info = client.call("get", task_id="gone")
        assert (info["status"], info["error"]) == ("failed", failed["error"])


@pytest.mark.timeout(30)
@pytest.mark.anyio
async def test_the_client_and_the_command_retry_a_failed_download(
    fresh: Served, tmp_path: Path
) -> None:
    library = fresh.library
    first, second = new_payload(tmp_path), new_payload(tmp_path)
    with fresh.client() as client, subscribe(fresh) as events:
        fail_at_check(client, events, library, first, "by-client", peers=[])
        fail_at_check(client, events, library, second, "by-command", peers=[])

    async with DlkeeperClient(fresh.daemon.socket, connect_timeout=5) as bot:
        info = await bot.retry("by-client")
        assert (info.task_id, info.error) == ("by-client", None)
        assert info.status != "failed"
        with pytest.raises(BadRequest):
            await bot.retry("by-client")  # not failed any more
        with pytest.raises(NotFound):
            await bot.retry("unknown")

    result = dlkeeper("retry", "by-command", socket=fresh.daemon.socket)
    assert result.returncode == 0, result
    assert result.stdout in {f"by-command: {s}\n" for s in ("queued", "checking", "downloading")}
    again = dlkeeper("retry", "by-command", socket=fresh.daemon.socket)
    assert again.returncode == 1
    assert "bad_request" in again.stderr, again
    assert library.state()["by-command"]["error"] is None


def dlkeeper(*args: str, socket: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--socket", str(socket)],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "COLUMNS": "80", "TERM": "dumb"},
        check=False,
    )
