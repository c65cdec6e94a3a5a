"""Writes the disk refuses, seen from outside (issue 11, "a full disk"): a `.fastresume` the disk
refuses is kept and written once there is space, and while the state file cannot be written
the daemon goes on answering and petting systemd's watchdog (a restart would not free the
disk), with the problem in `ping`. Real daemons on real, full tmpfs mounts (root only)."""

from __future__ import annotations

import time
from pathlib import Path

import libtorrent as lt
import pytest

from tests.api import (
    DEADLINE,
    NO_QUEUE,
    add_torrent,
    b64,
    code_of,
    new_payload,
    seeding_now,
    wait_status,
    wait_until,
)
from tests.daemons import Daemon, running_daemon, write_config
from tests.mounts import fill, needs_root, tmpfs

pytestmark = [needs_root, pytest.mark.timeout(60)]


def problems(daemon: Daemon) -> list[str]:
    with daemon.client() as client:
        found: list[str] = client.call("ping")["problems"]
        return found


def claims_every_piece(path: Path) -> bool:
    params = lt.read_resume_data(path.read_bytes())
    return params.ti is not None and sum(params.have_pieces) == params.ti.num_pieces()


def test_a_fastresume_the_full_disk_refused_is_written_once_there_is_space(
    tmp_path: Path,
) -> None:
    library = tmp_path / "library"
    config = write_config(tmp_path / "etc", library, libtorrent=NO_QUEUE)
    torrents = library / "downloads" / "torrents"
    payload = new_payload(tmp_path / "payload", {"film.mkv": 600_000})
    # Only the torrents folder is on the small disk: the payload goes on being written.
    with (
        tmpfs(torrents, "1m"),
        seeding_now(payload) as seeder,
        running_daemon(config) as daemon,
        daemon.client() as client,
    ):
        add_torrent(client, payload, task_id="film", peers=[seeder.peer], paused=True)
        filler = fill(torrents)  # the .torrent copy is in; resume data will not fit
        client.call("resume", task_id="film")
        wait_status(client, "film", "completed")
        resume = torrents / "film.fastresume"
        wait_until(
            lambda: any(str(resume) in problem for problem in problems(daemon)),
            "the refused resume write to be a problem",
        )
        assert not resume.exists() or not claims_every_piece(resume)

        filler.unlink()
        wait_until(resume.exists, "the resume data to be written")
        assert claims_every_piece(resume)
        wait_until(lambda: problems(daemon) == [], "the problem to be over")
    log = daemon.log.read_text()
    assert log.count(f"problem: cannot write {resume}") == 1, log[-3000:]
    assert log.count("problem over: ") >= 1


def test_the_watchdog_is_petted_while_the_state_file_cannot_be_written(tmp_path: Path) -> None:
    library = tmp_path / "library"
    payload = new_payload(tmp_path / "payload", {"film.mkv": 100_000})
    with tmpfs(library, "1m"):  # the state's disk fills; the downloads are elsewhere
        downloads = tmp_path / "downloads"
        config = write_config(
            tmp_path / "etc", library, download_path=str(downloads), libtorrent=NO_QUEUE
        )
        daemon = Daemon(config, env={"WATCHDOG_USEC": "400000"})  # WATCHDOG=1 every 0.2 s
        try:
            daemon.wait_ready()
            filler = fill(library)
            with daemon.client() as client:
                refused = client.request("add", torrent_b64=b64(payload.torrent), task_id="film")
                assert code_of(refused) == "internal", refused
                assert client.call("list")["downloads"] == []  # answered from what is on disk
                wait_until(
                    lambda: any("cannot be written" in p for p in problems(daemon)),
                    "the failing state write to be a problem",
                )
                # Three seconds of a disk that stays full: the watchdog is petted all along.
                daemon.notices.clear()
                started = time.monotonic()
                while time.monotonic() - started < 3:
                    daemon.wait_for_notice("WATCHDOG=1", timeout=DEADLINE)
                    daemon.notices.clear()
                assert client.call("ping")["ready"] is True

                filler.unlink()
                wait_until(lambda: problems(daemon) == [], "the problem to be over")
                add_torrent(client, payload, task_id="film")
                assert client.call("get", task_id="film")["task_id"] == "film"
        finally:
            daemon.close()
