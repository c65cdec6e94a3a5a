"""The whole daemon on the USB drive a user bought: library_path and download_path on a FAT or
exFAT file system, which has no hard links (os.link says EPERM), through FUSE on this machine.
Payloads stay small: FUSE's FAT writes are slow."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.api import NO_QUEUE, b64, seeding_now, wait_event, wait_status, wait_until
from tests.daemons import Daemon, RawClient, running_daemon, write_config
from tests.mounts import kernel_has, loop_mounted, make_image, needs_filesystem, needs_root
from tests.torrents import Payload, make_payload

pytestmark = needs_root

IMAGE_MIB = 64
FILES = {"e01.mkv": 2 << 20, "e02.srt": 30_000}
# fusefat refuses a truncate that grows a file (EPERM; the kernel's vfat driver allows it), and
# libtorrent grows files so (file_truncate, the download fails), whatever its disk settings.
FUSEFAT_CANNOT_DOWNLOAD = (
    "FUSE's fusefat refuses to grow a file by truncate, which libtorrent needs; "
    "the kernel's vfat driver (not on this machine) allows it"
)


@dataclass(frozen=True)
class Drive:
    """A mounted FAT or exFAT file system; `no_payloads` says why libtorrent cannot write
    there (None when it can)."""

    mountpoint: Path
    no_payloads: str | None


@pytest.fixture(
    params=[
        pytest.param("vfat", marks=needs_filesystem("vfat")),
        pytest.param("exfat", marks=needs_filesystem("exfat")),
    ]
)
def drive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Drive]:
    fstype: str = request.param
    image = tmp_path / f"{fstype}.img"
    make_image(image, fstype, IMAGE_MIB)
    with loop_mounted(image, tmp_path / "drive", fstype) as mountpoint:
        fuse_fat = fstype == "vfat" and not kernel_has("vfat")
        yield Drive(mountpoint, FUSEFAT_CANNOT_DOWNLOAD if fuse_fat else None)


def library_on(drive: Drive, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The config, library_path and download_path of a library wholly on `drive`."""
    library = drive.mountpoint / "library"
    download_path = library / "downloads"
    config = write_config(
        tmp_path / "etc", library, download_path=str(download_path), libtorrent=NO_QUEUE
    )
    return config, library, download_path


def saved(library: Path, name: str = "downloads.json") -> dict[str, dict[str, object]]:
    downloads = json.loads((library / "data" / name).read_bytes())["downloads"]
    assert isinstance(downloads, dict)
    return downloads


def hashes_match(payload: Payload, download_path: Path) -> bool:
    return all(
        hashlib.sha256((download_path / relative).read_bytes()).hexdigest() == digest
        for relative, digest in payload.file_hashes.items()
    )


def downloaded(client: RawClient, task_id: str) -> int:
    info = client.call("get", task_id=task_id)
    assert isinstance(info["downloaded_bytes"], int)
    return info["downloaded_bytes"]


@pytest.mark.timeout(60)
def test_the_state_on_a_fat_drive_is_saved_backed_up_and_kept_across_a_restart(
    drive: Drive, tmp_path: Path
) -> None:
    # No hard links there: the .bak used to be an os.link, whose EPERM failed every state
    # write after the first.
    config, library, _ = library_on(drive, tmp_path)
    payload = make_payload(tmp_path / "seed", "Show", FILES)
    with running_daemon(config) as daemon, daemon.client() as client:
        client.call("add", torrent_b64=b64(payload.torrent), task_id="usb", paused=True)
        client.call("set_files", task_id="usb", file_priorities=[7, 0])
        assert saved(library)["usb"]["file_priorities"] == [7, 0]
        assert saved(library, "downloads.json.bak")["usb"]["file_priorities"] == []
        assert daemon.stop() == 0
    with running_daemon(config) as daemon, daemon.client() as client:
        info = client.call("get", task_id="usb")
        assert info["status"] == "paused"
        assert [file["priority"] for file in info["files"]] == [7, 0]
        client.call("cancel", task_id="usb")
        assert saved(library) == {}
        assert saved(library, "downloads.json.bak")["usb"]["status"] == "paused"
        assert daemon.stop() == 0
    leftovers = [path.name for path in (library / "data").iterdir() if path.suffix == ".tmp"]
    assert leftovers == []


@pytest.mark.timeout(120)
def test_a_download_on_a_fat_drive_pauses_resumes_completes_and_survives_restarts(
    drive: Drive, tmp_path: Path
) -> None:
    if drive.no_payloads is not None:
        pytest.skip(drive.no_payloads)
    config, library, download_path = library_on(drive, tmp_path)
    payload = make_payload(tmp_path / "seed", "Show", FILES)
    with seeding_now(payload, upload_rate_limit=768 << 10) as seeder:
        with running_daemon(config) as daemon, daemon.client() as client:
            client.call("add", torrent_b64=b64(payload.torrent), task_id="usb", peers=[seeder.peer])
            wait_until(lambda: downloaded(client, "usb") > 0, "the first bytes")
            client.call("pause", task_id="usb")
            assert saved(library)["usb"]["status"] == "paused"
            # Every write after the first keeps the one before as .bak: a copy here.
            assert saved(library, "downloads.json.bak")["usb"]["status"] != "paused"
            assert daemon.stop() == 0
        assert (download_path / "torrents" / "usb.fastresume").stat().st_size > 0

        daemon = Daemon(config)
        try:
            daemon.wait_ready()
            with daemon.client() as client, daemon.client() as events:
                events.call("subscribe")
                # Still paused, and resumed from its resume data: the bytes are not fetched again.
                wait_status(client, "usb", "paused")
                wait_until(lambda: downloaded(client, "usb") > 0, "the resumed bytes")
                client.call("resume", task_id="usb")
                event = wait_event(events, "download.completed", "usb", timeout=60)
                assert event["save_path"] == str(download_path)
                assert saved(library)["usb"]["status"] == "completed"
            assert daemon.stop() == 0
        finally:
            daemon.close()
    assert hashes_match(payload, download_path)
    with running_daemon(config) as daemon, daemon.client() as client:
        assert client.call("get", task_id="usb")["status"] == "completed"
        client.call("ack", task_id="usb")
        assert saved(library) == {}
        assert saved(library, "downloads.json.bak")["usb"]["status"] == "completed"
        assert daemon.stop() == 0
