"""`rebuild` and the daemon's own fallback to `downloads.json.bak` merge what the backup knows
with the kept `.torrent`/`.fastresume` files (CONTRACT section 4). The libraries are made by a
real `dlkeeper serve`: its adds, pauses and cancels, its backup one write behind, its files."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from actors.layout import Layout
from actors.metainfo import bdecode
from actors.state import DownloadRecord, DownloadStatus, MigrationContext, decode_state
from supervisor.state_cli import main
from tests.daemons import RawClient, running_daemon, write_config
from tests.swarm import seeding
from tests.torrents import Payload, make_payload

DEADLINE = 20.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Library:
    """A daemon's library, and `dlkeeper-state` run on it in-process."""

    config: Path
    layout: Layout
    capsys: pytest.CaptureFixture[str]

    @property
    def backup(self) -> Path:
        return self.layout.state_dir / "downloads.json.bak"

    def records(self, path: Path | None = None) -> dict[str, DownloadRecord]:
        path = path or self.layout.state_file
        context = MigrationContext(download_path=self.layout.download_path)
        return decode_state(path.read_bytes(), path, context).downloads

    def statuses(self, path: Path | None = None) -> dict[str, str]:
        return {task: str(record.status) for task, record in self.records(path).items()}

    def run(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = main(["--config", str(self.config), *args])
        out, err = self.capsys.readouterr()
        return status, out, err

    def resume_flags(self, task_id: str) -> tuple[object, object]:
        """(paused, auto_managed) of the download's resume data; (None, None) while none."""
        try:
            resume = bdecode(self.layout.resume_path(task_id).read_bytes())
        except FileNotFoundError:
            return None, None
        assert isinstance(resume, dict)
        return resume.get(b"paused"), resume.get(b"auto_managed")


@pytest.fixture
def library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Library:
    root = tmp_path / "library"
    config = write_config(tmp_path / "etc", root, resume_save_interval=0.2)
    return Library(config, Layout(root, root / "downloads"), capsys)


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Payload]:
    root = tmp_path_factory.mktemp("payloads")
    return {
        name: make_payload(root, name, {"a.mkv": 200_000, "b.srt": 1_000}, piece_size=16384)
        for name in ("Alpha", "Beta", "Gamma")
    }


@contextmanager
def daemon_on(library: Library) -> Iterator[RawClient]:
    """A client of a daemon on `library`, stopped cleanly (resume data saved) at the end."""
    with running_daemon(library.config) as daemon:
        with daemon.client() as client:
            yield client
        assert daemon.stop() == 0


def add_torrent(client: RawClient, task_id: str, payload: Payload, **extra: Any) -> None:
    torrent = base64.b64encode(payload.torrent).decode()
    client.call("add", task_id=task_id, torrent_b64=torrent, **extra)


def magnet_of(payload: Payload) -> str:
    return f"magnet:?xt=urn:btih:{payload.info_hash}&dn={payload.name}"


def lose_state_file(library: Library) -> None:
    library.layout.state_file.unlink()
    assert library.backup.exists()


# --- rebuild ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_rebuild_keeps_the_third_add_the_backup_lacks_and_the_magnet_only_the_backup_holds(
    library: Library, payloads: dict[str, Payload]
) -> None:
    with daemon_on(library) as client:
        # Added paused, so that no write follows the third add: the backup holds the first two.
        add_torrent(
            client,
            "t1",
            payloads["Alpha"],
            paused=True,
            peers=["127.0.0.1:1"],
            torrent_metadata={"title": "Alpha"},
            validation_metadata={"size": 201_000},
        )
        client.call(
            "add",
            task_id="m2",
            magnet=magnet_of(payloads["Gamma"]),
            paused=True,
            peers=["127.0.0.1:2"],
            torrent_metadata={"title": "Gamma"},
        )
        add_torrent(client, "t3", payloads["Beta"], paused=True)
    backup = library.records(library.backup)
    assert sorted(backup) == ["m2", "t1"]
    lose_state_file(library)

    status, out, err = library.run("rebuild")

    assert status == 0, err
    rebuilt = library.records()
    assert sorted(rebuilt) == ["m2", "t1", "t3"]
    assert rebuilt["t1"] == backup["t1"]  # peers and both metadata objects, as the backup had
    assert rebuilt["m2"] == backup["m2"]  # a magnet without metadata: no file knows it
    assert (rebuilt["t3"].info_hash, rebuilt["t3"].status) == (
        payloads["Beta"].info_hash,
        DownloadStatus.PAUSED,
    )
    torrents = library.layout.torrents_dir
    assert out.startswith(
        f"rebuilt 3 downloads in {library.layout.state_file} from {torrents} and "
        "downloads.json.bak:\n"
    )
    assert "  t3: added from its files (the backup does not hold it)\n" in out
    assert out.endswith(
        "not recoverable for t3 (not in downloads.json.bak): "
        "peers, torrent_metadata, validation_metadata\n"
    )


def pause_the_last_of_two(library: Library, payloads: dict[str, Payload]) -> None:
    """Two downloads started, then `t2` paused: the backup is the state before the pause."""
    with daemon_on(library) as client:
        add_torrent(client, "t1", payloads["Alpha"])
        add_torrent(client, "t2", payloads["Beta"])
        # Each start is saved (queued -> downloading); the pause must be the last write.
        wait_for(
            lambda: library.statuses() == {"t1": "downloading", "t2": "downloading"},
            "both downloads saved as downloading",
        )
        client.call("pause", task_id="t2")
        wait_for(lambda: library.resume_flags("t2") == (1, 0), "the resume data of the pause")
    assert library.statuses(library.backup) == {"t1": "downloading", "t2": "downloading"}
    lose_state_file(library)


@pytest.mark.timeout(30)
def test_rebuild_takes_the_pause_from_resume_data_saved_after_the_backup(
    library: Library, payloads: dict[str, Payload]
) -> None:
    pause_the_last_of_two(library, payloads)
    status, out, err = library.run("rebuild")
    assert status == 0, err
    assert library.statuses() == {"t1": "downloading", "t2": "paused"}
    assert (
        "  t2: paused (the backup says downloading), from resume data saved after the backup\n"
    ) in out


@pytest.mark.timeout(30)
def test_rebuild_keeps_the_backups_status_over_older_resume_data(
    library: Library, payloads: dict[str, Payload]
) -> None:
    pause_the_last_of_two(library, payloads)
    saved = library.backup.stat().st_mtime
    os.utime(library.layout.resume_path("t2"), (saved - 60, saved - 60))
    status, out, err = library.run("rebuild")
    assert status == 0, err
    assert library.statuses() == {"t1": "downloading", "t2": "downloading"}
    assert "t2:" not in out


@pytest.mark.timeout(30)
def test_rebuild_leaves_out_a_download_cancelled_after_the_backup(
    library: Library, payloads: dict[str, Payload]
) -> None:
    with daemon_on(library) as client:
        add_torrent(client, "gone", payloads["Alpha"], paused=True)
        add_torrent(client, "kept", payloads["Beta"], paused=True)
        client.call("add", task_id="mag", magnet=magnet_of(payloads["Gamma"]), paused=True)
        client.call("cancel", task_id="gone")
    assert sorted(library.records(library.backup)) == ["gone", "kept", "mag"]
    gone = library.records(library.backup)["gone"]
    lose_state_file(library)

    status, out, err = library.run("rebuild")

    assert status == 0, err
    assert sorted(library.records()) == ["kept", "mag"]
    reason = (
        "its .torrent and resume data are gone: it was cancelled or acknowledged after the "
        "backup was written"
    )
    assert f"  gone: left out: {reason}\n" in out
    assert "the entries left out are kept in downloads.json.quarantine\n" in out
    quarantine = orjson.loads((library.layout.state_dir / "downloads.json.quarantine").read_bytes())
    assert DownloadRecord.model_validate(quarantine["downloads"]["gone"]) == gone
    assert quarantine["reasons"]["gone"]["reason"] == reason


@pytest.mark.timeout(30)
def test_rebuild_with_a_backup_that_does_not_load_uses_the_files_and_says_so(
    library: Library, payloads: dict[str, Payload]
) -> None:
    with daemon_on(library) as client:
        add_torrent(client, "t1", payloads["Alpha"], paused=True)
        add_torrent(client, "t2", payloads["Beta"], paused=True)
    lose_state_file(library)
    library.backup.write_bytes(b"\x00 garbage")
    status, out, err = library.run("rebuild")
    assert status == 0, err
    assert library.statuses() == {"t1": "paused", "t2": "paused"}
    assert out.startswith(
        f"rebuilt 2 downloads in {library.layout.state_file} from {library.layout.torrents_dir}:"
    )
    assert "downloads.json.bak does not load (not JSON: " in out
    assert out.endswith(
        "; rebuilt from the files\n"
        "not recoverable from these files: peers, torrent_metadata, validation_metadata\n"
    )
    assert library.backup.read_bytes() == b"\x00 garbage"  # the next write replaces it


# --- the daemon's fallback to the backup --------------------------------------------------------


@pytest.mark.timeout(45)
def test_the_daemon_falling_back_to_the_backup_keeps_the_pause_the_damage_took(
    library: Library, payloads: dict[str, Payload]
) -> None:
    with seeding(*payloads.values()) as seeder:
        seeder.session.pause()  # refuses the daemon until the restart: nothing is downloaded
        with daemon_on(library) as client:
            for task_id, name in (("t1", "Alpha"), ("t2", "Beta"), ("t3", "Gamma")):
                add_torrent(client, task_id, payloads[name], peers=[seeder.peer])
            wait_for(
                lambda: set(library.statuses().values()) == {"downloading"},
                "the three downloads saved as downloading",
            )
            client.call("pause", task_id="t3")  # the last acknowledged change
            wait_for(lambda: library.resume_flags("t3") == (1, 0), "the resume data of the pause")
        assert library.statuses(library.backup)["t3"] == "downloading"
        library.layout.state_file.write_bytes(os.urandom(512))  # outside damage
        seeder.session.resume()

        with running_daemon(library.config) as daemon, daemon.client() as client:
            client.call("subscribe")
            finished = {client.next_event("download.completed")["task_id"] for _ in range(2)}
            paused = client.call("get", task_id="t3")
            assert daemon.stop() == 0

    assert finished == {"t1", "t2"}
    assert (paused["status"], paused["downloaded_bytes"]) == ("paused", 0)
    assert library.resume_flags("t3") == (1, 0)  # libtorrent had it paused until the stop
    assert library.statuses()["t3"] == "paused"
    log = (library.config.parent / "daemon.log").read_text()
    assert (
        "state: the backup reconciled with the kept files: t3: paused (the backup says "
        "downloading), from resume data saved after the backup"
    ) in log
    assert "state: loaded 3 downloads from the backup of" in log
