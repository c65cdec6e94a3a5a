"""A payload disk that fills during a download (issue 11): the download waits for space instead
of failing, the others on that disk do not start meanwhile, and all go on by themselves once
there is space again. A real daemon downloads from a real seeder onto a small tmpfs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.api import MiB, add_torrent, new_payload, seeding_now, wait_status, wait_until
from tests.daemons import Daemon, RawClient, running_daemon, write_config
from tests.mounts import fill, needs_root, tmpfs
from tests.torrents import Payload

pytestmark = [needs_root, pytest.mark.timeout(60)]

DISK_SIZE = "16m"
LEFT_FREE = 3 * MiB  # what the filler leaves: less than the big payload needs
SETTINGS: dict[str, str | int | bool] = {
    # One download at a time: the second waits in libtorrent's queue, which would start it as
    # soon as the first stops (slow ones counting too, so that the first keeps its slot).
    "active_downloads": 1,
    "active_limit": 10,
    "dont_count_slow_torrents": False,
    # A download paused and resumed reconnects to a peer it had only after min_reconnect_time
    # (60 s): the test's one seeder must come back within the test's few seconds of waiting.
    "min_reconnect_time": 1,
}


@dataclass(frozen=True)
class Disk:
    """A daemon whose download_path is on a small tmpfs, and a subscriber to its events."""

    daemon: Daemon
    downloads: Path
    client: RawClient
    events: RawClient


@contextmanager
def daemon_on_small_disk(tmp_path: Path) -> Iterator[Disk]:
    with tmpfs(tmp_path / "disk", DISK_SIZE) as mountpoint:
        downloads = mountpoint / "downloads"
        config = write_config(
            tmp_path / "config",
            tmp_path / "library",  # the state file is elsewhere: only the payload disk fills
            download_path=str(downloads),
            libtorrent=SETTINGS,
        )
        with (
            running_daemon(config) as daemon,
            daemon.client() as client,
            daemon.client() as events,
        ):
            events.call("subscribe")
            yield Disk(daemon, downloads, client, events)


def waiting_info(client: RawClient, task_id: str) -> dict[str, Any]:
    """The DownloadInfo of `task_id` once it waits for disk space and says how much there is
    (for a moment after the failed write it names libtorrent's error), never `failed` before."""

    def waiting() -> dict[str, Any] | None:
        info: dict[str, Any] = client.call("get", task_id=task_id)
        assert info["status"] != "failed", info
        error = info["error"] or ""
        said = error.startswith("waiting for disk space: ") and "(min_free_bytes)" in error
        return info if info["status"] == "queued" and said else None

    return wait_until(waiting, f"{task_id} to wait for disk space")


def assert_files_match(downloads: Path, payload: Payload) -> None:
    for relative, digest in payload.file_hashes.items():
        assert hashlib.sha256((downloads / relative).read_bytes()).hexdigest() == digest, relative


def assert_never_failed(disk: Disk) -> None:
    """No download.failed was sent (every event so far read, up to a ping's answer)."""
    disk.events.call("ping")
    assert [e for e in disk.events.events if e["event"] == "download.failed"] == []


def log_of(disk: Disk) -> str:
    return disk.daemon.log.read_text()


def test_a_download_that_fills_the_disk_waits_and_goes_on_when_space_is_back(
    tmp_path: Path,
) -> None:
    big = new_payload(tmp_path, {"big.bin": 8 * MiB})
    small = new_payload(tmp_path, {"small.bin": 1 * MiB})
    with seeding_now(big, small) as seeder, daemon_on_small_disk(tmp_path) as disk:
        client = disk.client
        # Added while they fit (the add preflight would refuse them on the full disk), paused
        # until the disk has filled.
        add_torrent(client, big, task_id="big", peers=[seeder.peer], paused=True)
        add_torrent(client, small, task_id="small", peers=[seeder.peer], paused=True)
        filler = fill(disk.downloads, leave_bytes=LEFT_FREE)
        client.call("resume", task_id="big")
        client.call("resume", task_id="small")  # behind it in libtorrent's queue

        info = waiting_info(client, "big")
        assert f"{disk.downloads} has " in info["error"]
        assert "must stay free (min_free_bytes)" in info["error"]
        # The other download on that disk waits too, and never started: nothing written.
        wait_until(
            lambda: "problem: 2 downloads waiting for disk space on " in log_of(disk),
            "the full disk to be a problem",
        )
        info = waiting_info(client, "small")
        assert info["downloaded_bytes"] == 0
        assert not (disk.downloads / small.name).exists()
        # A pause while it waits is kept after it; a resume is answered, and it waits on.
        assert client.call("pause", task_id="big")["status"] == "paused"
        resumed = client.call("resume", task_id="big")
        assert resumed["status"] == "queued", resumed
        assert resumed["error"].startswith(f"waiting for disk space: {disk.downloads} has "), (
            resumed
        )
        assert client.call("pause", task_id="small")["status"] == "paused"

        filler.unlink()
        wait_status(client, "big", "completed")
        assert_files_match(disk.downloads, big)
        wait_until(
            lambda: "problem over: " in log_of(disk), "the full disk to be no problem any more"
        )
        info = client.call("get", task_id="small")
        assert (info["status"], info["error"]) == ("paused", None)  # the pause was kept
        assert not (disk.downloads / small.name).exists()
        client.call("resume", task_id="small")
        wait_status(client, "small", "completed")
        assert_files_match(disk.downloads, small)
        assert_never_failed(disk)


def test_a_magnet_whose_metadata_shows_it_does_not_fit_waits_for_space(tmp_path: Path) -> None:
    payload = new_payload(tmp_path, {"big.bin": 8 * MiB})
    with seeding_now(payload) as seeder, daemon_on_small_disk(tmp_path) as disk:
        client = disk.client
        filler = fill(disk.downloads, leave_bytes=LEFT_FREE)
        client.call("add", magnet=seeder.magnet(payload), task_id="magnet")

        info = waiting_info(client, "magnet")
        assert info["files"], "its metadata is known"
        assert "the download needs 8.0 MiB more" in info["error"], info
        assert "must stay free (min_free_bytes)" in info["error"], info
        wait_until(
            lambda: "problem: 1 download waiting for disk space on " in log_of(disk),
            "the magnet's wait to be a problem",
        )

        filler.unlink()
        wait_status(client, "magnet", "completed")
        assert_files_match(disk.downloads, payload)
        assert "problem over: " in log_of(disk)
        assert_never_failed(disk)
