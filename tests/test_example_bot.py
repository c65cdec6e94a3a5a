"""scripts/example_bot.py as a bot author would run it: against a real daemon and a real seeder,
killed and run again, and across a daemon restart."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from supervisor.client import DownloadCompletedEvent
from tests.daemons import DEADLINE, Daemon, running_daemon, write_config
from tests.swarm import seeding
from tests.test_hostile_input import hostile_payload
from tests.torrents import Payload, make_payload

pytestmark = pytest.mark.timeout(60)

BOT = Path(__file__).resolve().parent.parent / "scripts" / "example_bot.py"
SLOW = 300_000  # bytes/s from the seeder: long enough to act while the download runs


@pytest.fixture
def payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "seed", "Film", {"film.mkv": 900_000, "film.srt": 2_000})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "etc", tmp_path / "library")


def bot_command(daemon: Daemon, library: Path, peer: str, magnet: str) -> list[str]:
    return [
        sys.executable,
        str(BOT),
        "--socket",
        str(daemon.socket),
        "--library",
        str(library),
        "--peer",
        peer,
        magnet,
    ]


@contextmanager
def running_bot(command: list[str]) -> Iterator[subprocess.Popen[str]]:
    bot = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        yield bot
    finally:
        bot.kill()
        bot.wait(DEADLINE)
        assert bot.stderr is not None
        bot.stderr.close()


def assert_imported(library: Path, payload: Payload) -> None:
    imported = sorted(str(path.relative_to(library)) for path in library.rglob("*"))
    assert imported == sorted([*payload.file_hashes, payload.name])  # nothing half-done left
    for relative, digest in payload.file_hashes.items():
        assert hashlib.sha256((library / relative).read_bytes()).hexdigest() == digest


def test_the_bot_imports_its_download_and_acks_it(
    config: Path, tmp_path: Path, payload: Payload
) -> None:
    library = tmp_path / "movies"
    with seeding(payload) as seeder, running_daemon(config) as daemon:
        command = bot_command(daemon, library, seeder.peer, seeder.magnet(payload))
        bot = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)
        assert bot.returncode == 0, bot.stderr
        assert_imported(library, payload)
        with daemon.client() as client:
            assert client.call("list") == {"downloads": []}


def test_a_library_it_cannot_write_to_is_one_line_exit_1_and_the_completion_stays(
    config: Path, tmp_path: Path, payload: Payload
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    library = blocker / "movies"
    with seeding(payload) as seeder, running_daemon(config) as daemon:
        command = bot_command(daemon, library, seeder.peer, seeder.magnet(payload))
        bot = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)
        assert bot.returncode == 1
        assert "Traceback" not in bot.stderr
        assert "Not a directory" in bot.stderr.splitlines()[-1]
        with daemon.client() as client:  # not acked: offered again to the next run
            (download,) = client.call("list")["downloads"]
            assert download["status"] == "completed"


def test_a_bot_killed_before_the_completion_imports_it_once_when_run_again(
    config: Path, tmp_path: Path, payload: Payload
) -> None:
    library = tmp_path / "movies"
    with (
        seeding(payload, upload_rate_limit=SLOW) as seeder,
        running_daemon(config) as daemon,
        daemon.client() as watcher,
    ):
        watcher.call("subscribe")
        command = bot_command(daemon, library, seeder.peer, seeder.magnet(payload))
        with running_bot(command) as first:
            task_id = watcher.next_event("download.added")["task_id"]
            first.kill()
        assert watcher.call("get", task_id=task_id)["status"] != "completed"
        again = subprocess.run(
            command, capture_output=True, text=True, timeout=DEADLINE, check=False
        )
        assert again.returncode == 0, again.stderr
        # The same task_id again: the daemon's download went on, no second one was added.
        assert f"added {task_id} " in again.stderr
        assert again.stderr.count("imported ") == 1, again.stderr
        assert_imported(library, payload)
        assert watcher.call("list") == {"downloads": []}
        added = [event for event in watcher.events if event["event"] == "download.added"]
        assert added == []


def test_the_bot_carries_on_across_a_daemon_restart(
    config: Path, tmp_path: Path, payload: Payload
) -> None:
    library = tmp_path / "movies"
    with seeding(payload, upload_rate_limit=SLOW) as seeder:
        first = Daemon(config)
        try:
            first.wait_ready()
            command = bot_command(first, library, seeder.peer, seeder.magnet(payload))
            with first.client() as watcher:
                watcher.call("subscribe")  # before the bot adds, to see its download.added
                with running_bot(command) as bot:
                    task_id = watcher.next_event("download.added")["task_id"]
                    assert first.stop() == 0
                    with running_daemon(config) as second:
                        assert bot.wait(DEADLINE) == 0
                        assert bot.stderr is not None
                        log = bot.stderr.read()
                        assert f"imported {task_id}:" in log
                        assert_imported(library, payload)
                        with second.client() as client:
                            assert client.call("list") == {"downloads": []}
        finally:
            first.close()


# --- a hostile torrent --------------------------------------------------------------------------


def test_the_bot_imports_a_torrent_listing_paths_out_of_its_folder_where_libtorrent_wrote_them(
    config: Path, tmp_path: Path
) -> None:
    payload, _ = hostile_payload(tmp_path / "seed")  # lists ../../../etc/cron.d/x and /etc/passwd
    torrent = tmp_path / "hostile.torrent"
    torrent.write_bytes(payload.torrent)
    library = tmp_path / "media" / "shows"
    with seeding(payload) as seeder, running_daemon(config) as daemon:
        command = bot_command(daemon, library, seeder.peer, str(torrent))
        bot = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)
        assert bot.returncode == 0, bot.stderr
    imported = {str(path.relative_to(library)) for path in library.rglob("*") if path.is_file()}
    assert imported == set(payload.file_hashes)  # show/_/_/_/etc/cron.d/x, show/etc/passwd, ...
    for relative, digest in payload.file_hashes.items():
        assert hashlib.sha256((library / relative).read_bytes()).hexdigest() == digest
    assert not (library / "show/../../../etc/cron.d/x").exists()


def test_the_bot_refuses_a_file_it_would_write_outside_its_library_and_leaves_it_unacked(
    config: Path, tmp_path: Path, payload: Payload
) -> None:
    library = tmp_path / "movies"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    library.mkdir()
    (library / payload.name).symlink_to(elsewhere)  # Film/film.mkv would land in elsewhere/
    with seeding(payload) as seeder, running_daemon(config) as daemon:
        command = bot_command(daemon, library, seeder.peer, seeder.magnet(payload))
        bot = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)
        assert bot.returncode == 1, bot.stderr
        last = bot.stderr.splitlines()[-1]
        assert "refusing to import" in last and "outside" in last, bot.stderr
        assert "Traceback" not in bot.stderr
        with daemon.client() as client:  # not acked: a person decides
            (download,) = client.call("list")["downloads"]
            assert download["status"] == "completed"
    assert list(elsewhere.iterdir()) == []


def load_bot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_bot", BOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bot_imports_nothing_of_a_completion_naming_a_path_with_dot_dot(
    tmp_path: Path,
) -> None:
    # The daemon reports libtorrent's paths; the bot does not take that on trust.
    bot = load_bot()
    save_path, library = tmp_path / "downloads", tmp_path / "media" / "movies"
    (save_path / "show").mkdir(parents=True)
    (library / "show").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"not yours")
    (save_path / "show" / "ok.mkv").write_bytes(b"fine")
    event = DownloadCompletedEvent.model_validate(
        {
            "seq": 1,
            "task_id": "hostile",
            "name": "show",
            "info_hash": None,
            "save_path": str(save_path),
            "files": [
                {"path": "show/ok.mkv", "size": 4, "priority": 4},
                {"path": "show/../../secret", "size": 9, "priority": 4},
            ],
            "torrent_metadata": {},
            "validation_metadata": {},
            "completed_at": "2026-11-24T22:00:00Z",
        }
    )
    with pytest.raises(bot.UnsafePath, match=re.escape("show/../../secret")):
        bot.import_download(event, library)
    assert sorted(path.name for path in tmp_path.joinpath("media").rglob("*")) == [
        "movies",
        "show",
    ]
