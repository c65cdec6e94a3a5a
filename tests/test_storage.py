"""Storage that is not there: dlkeeper never creates library_path or download_path (CONTRACT.md
section 3), says exactly what is missing and exits 4 (systemd tries again later), and never
turns downloads into `failed` because their drive is not mounted (issue 11, part 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import exits
from tests.api import (
    NO_QUEUE,
    add_torrent,
    files_under,
    new_payload,
    payload_files,
    seeding_now,
    wait_status,
    wait_until,
)
from tests.daemons import DEADLINE, Daemon, layout_of, running_daemon, write_config
from tests.mounts import loop_mounted, make_image, needs_root, unmount


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=environment,
        check=False,
    )


def assert_refused_naming(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == exits.STORAGE_MISSING, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("dlkeeper: ")]
    assert len(said) == 1, result.stderr
    for word in words:
        assert word in said[0], said[0]
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("folder", ["library_path", "download_path"])
def test_a_missing_folder_is_named_and_never_created(tmp_path: Path, folder: str) -> None:
    library = tmp_path / "library"
    downloads = tmp_path / "drive" / "downloads"
    config = write_config(
        tmp_path / "etc", library, download_path=str(downloads), make_folders=False
    )
    # The other one is there: only the missing one is said.
    (downloads if folder == "library_path" else library).mkdir(parents=True)
    missing = library if folder == "library_path" else downloads

    result = serve(config)

    assert_refused_naming(result, folder, str(missing), "does not exist", "mounted")
    assert not missing.exists()
    if folder == "download_path":
        assert not (library / "data").exists()  # refused before the state was touched


@pytest.mark.timeout(30)
def test_a_download_path_that_is_a_file_is_named(tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "etc", library, download_path=str(blocker), make_folders=False)

    assert_refused_naming(serve(config), "download_path", str(blocker), "is not a folder")
    assert blocker.read_text() == "not a folder"


def add_and_stop(config: Path, task_id: str, tmp_path: Path) -> Path:
    """Adds one download from a real seeder, lets it complete and stops the daemon; the state
    file's bytes are returned to compare with later."""
    payload = new_payload(tmp_path / "payload", {"film.mkv": 300_000})
    layout = layout_of(config)
    with seeding_now(payload) as seeder, running_daemon(config) as daemon:
        with daemon.client() as client:
            add_torrent(client, payload, task_id=task_id, peers=[seeder.peer])
            wait_status(client, task_id, "completed")
        assert daemon.stop() == 0
    assert files_under(layout.download_path / payload.name) == payload_files(payload)
    return layout.state_file


@pytest.mark.timeout(60)
def test_an_empty_mount_point_with_no_torrents_folder_is_not_taken_for_the_library(
    tmp_path: Path,
) -> None:
    # download_path is a drive's mount point: unmounted, it is an empty folder on the SD card.
    library = tmp_path / "library"
    mount_point = tmp_path / "mnt" / "drive"
    config = write_config(
        tmp_path / "etc", library, download_path=str(mount_point), libtorrent=NO_QUEUE
    )
    state_file = add_and_stop(config, "film", tmp_path)
    before = state_file.read_bytes()
    (tmp_path / "mnt" / "drive").rename(tmp_path / "mnt" / "away")  # "unmounted"
    mount_point.mkdir()

    result = serve(config)

    assert_refused_naming(result, str(mount_point / "torrents"), "1 download", "mounted")
    assert list(mount_point.iterdir()) == []  # nothing written onto the "SD card"
    assert state_file.read_bytes() == before  # no download turned failed
    (tmp_path / "mnt" / "drive").rmdir()
    (tmp_path / "mnt" / "away").rename(mount_point)  # "mounted again"
    with running_daemon(config) as daemon, daemon.client() as client:
        assert client.call("get", task_id="film")["status"] == "completed"


@needs_root
@pytest.mark.timeout(90)
def test_a_drive_that_comes_and_goes(tmp_path: Path) -> None:
    """A real file system, on a loop device, holding the library and its downloads."""
    image = tmp_path / "drive.img"
    make_image(image, "ext4", 64)
    mount_point = tmp_path / "mnt"
    library = mount_point / "media"
    downloads = library / "downloads"
    config_dir = tmp_path / "etc"
    with loop_mounted(image, mount_point, "ext4"):
        config = write_config(config_dir, library, libtorrent=NO_QUEUE)
        state_file = add_and_stop(config, "film", tmp_path)
        before = state_file.read_bytes()

    # Unmounted: the daemon refuses, naming library_path, and writes nothing under the mount
    # point (a fresh library there would hide the real one once the drive is back).
    assert_refused_naming(serve(config), "library_path", str(library), "mounted")
    assert list(mount_point.iterdir()) == []

    # Only the download folder's drive missing (the state on the SD card, say): also refused.
    with loop_mounted(image, mount_point, "ext4"):
        sd_library = tmp_path / "sd" / "media"
        sd_library.mkdir(parents=True)
        shutil.move(library / "data", sd_library / "data")
    split = write_config(
        tmp_path / "etc-split",
        sd_library,
        download_path=str(downloads),
        libtorrent=NO_QUEUE,
        make_folders=False,
    )
    assert_refused_naming(serve(split), "download_path", str(downloads), "mounted")
    assert list(mount_point.iterdir()) == []
    assert json.loads((sd_library / "data" / "downloads.json").read_bytes()) == json.loads(before)

    # Mounted again: everything is there, nothing failed.
    with (
        loop_mounted(image, mount_point, "ext4"),
        running_daemon(split) as daemon,
        daemon.client() as client,
    ):
        info = client.call("get", task_id="film")
        assert info["status"] == "completed"
        assert info["error"] is None
        assert client.call("stats")["downloads"] == {"completed": 1}
        assert daemon.stop() == 0


@needs_root
@pytest.mark.timeout(90)
@pytest.mark.parametrize("at_mount_point", [False, True], ids=["below", "at-the-mount-point"])
def test_a_drive_unmounted_under_the_daemon_stops_it_and_fails_no_download(
    tmp_path: Path, at_mount_point: bool
) -> None:
    image = tmp_path / "drive.img"
    make_image(image, "ext4", 64)
    mount_point = tmp_path / "mnt"
    library = tmp_path / "sd" / "media"  # the state on the SD card, the downloads on the drive
    # At the mount point, the folder is still there once the drive is gone (an empty one on
    # the SD card): the daemon tells by its file system.
    downloads = mount_point if at_mount_point else mount_point / "downloads"
    payload = new_payload(tmp_path / "payload", {"film.mkv": 4_000_000})
    with loop_mounted(image, mount_point, "ext4"):
        config = write_config(
            tmp_path / "etc", library, download_path=str(downloads), libtorrent=NO_QUEUE
        )
        with seeding_now(payload, upload_rate_limit=200_000) as seeder:
            daemon = Daemon(config).wait_ready()
            try:
                with daemon.client() as client:
                    add_torrent(client, payload, task_id="film", peers=[seeder.peer])
                    wait_until(
                        lambda: client.call("get", task_id="film")["downloaded_bytes"] > 0,
                        "the download to start",
                    )
                unmount(mount_point)  # lazily: the worker still has the files open
                assert daemon.process.wait(DEADLINE) == exits.STORAGE_MISSING
            finally:
                daemon.close()
            log = daemon.log.read_text()
            gone = "is no longer on the file system" if at_mount_point else "does not exist"
            assert f"download_path {downloads} {gone}" in log, log[-2000:]
            assert "stopping (the downloads stay as they are)" in log, log[-2000:]
            state = json.loads((library / "data" / "downloads.json").read_bytes())
            assert state["downloads"]["film"]["status"] == "downloading"
            assert state["downloads"]["film"]["error"] is None
            assert not downloads.exists() or list(downloads.iterdir()) == []  # nothing made

            refused = str(downloads / "torrents") if at_mount_point else str(downloads)
            assert_refused_naming(serve(config), refused, "mounted")

            session = seeder.session  # the rest at full speed
            local = session.get_peer_class(session.local_peer_class_id)
            session.set_peer_class(session.local_peer_class_id, {**local, "upload_limit": 0})
            with (
                loop_mounted(image, mount_point, "ext4"),
                running_daemon(config) as again,
                again.client() as client,
            ):
                wait_status(client, "film", "completed")
                assert files_under(downloads / payload.name) == payload_files(payload)
