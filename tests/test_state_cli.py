"""`dlkeeper-state` on real damage: deleted, garbage and half-broken state files, lost .torrent
files, unknown ids, and a running daemon holding the lock. Real .torrent files (made with
libtorrent) and real `.fastresume` files written by a real `dlkeeper serve`."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from actors.layout import Layout
from actors.metainfo import bdecode, read_torrent
from actors.state import DownloadRecord, DownloadStatus, MigrationContext
from actors.statefile import StateStore
from supervisor.state_cli import main
from tests.daemons import Daemon, running_daemon, write_config
from tests.records import make_record
from tests.torrents import Payload, make_payload

DEADLINE = 20.0
STATE_EXECUTABLE = Path(sys.executable).with_name("dlkeeper-state")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Library:
    """A library folder and a download folder, and `dlkeeper-state` run on them in-process."""

    root: Path
    download_path: Path
    capsys: pytest.CaptureFixture[str]

    @property
    def layout(self) -> Layout:
        return Layout(self.root, self.download_path)

    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    @property
    def state_file(self) -> Path:
        return self.layout.state_file

    @property
    def torrents_dir(self) -> Path:
        return self.layout.torrents_dir

    def store(self) -> StateStore:
        return StateStore(self.state_dir, MigrationContext(download_path=self.download_path))

    def write_state(self, *records: DownloadRecord) -> None:
        store = self.store()
        store.acquire_lock()
        try:
            store.write({record.task_id: record for record in records})
        finally:
            store.release_lock()

    def read_state(self) -> dict[str, DownloadRecord]:
        decoded = self.store().read()
        assert decoded is not None
        return decoded.downloads

    def run(self, *args: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of `dlkeeper-state --library-path ... ARGS`."""
        self.capsys.readouterr()
        status = main(
            ["--library-path", str(self.root), "--download-path", str(self.download_path), *args]
        )
        out, err = self.capsys.readouterr()
        return status, out, err

    def torrent_record(
        self, task_id: str, payload: Payload, *, with_magnet: bool = False, **changes: Any
    ) -> DownloadRecord:
        """A download of `payload` whose .torrent is kept in torrents/ as the daemon keeps it."""
        path = self.torrents_dir / f"{task_id}.torrent"
        path.write_bytes(payload.torrent)
        fields: dict[str, Any] = {
            "task_id": task_id,
            "name": payload.name,
            "info_hash": payload.info_hash,
            "created_at": datetime(2026, 11, 24, 22, 0, tzinfo=UTC),
            "status": DownloadStatus.DOWNLOADING,
            "torrent_file_path": str(path),
            "magnet_link": f"magnet:?xt=urn:btih:{payload.info_hash}" if with_magnet else None,
            "save_path": str(self.download_path),
            "progress": 0.25,
        }
        return DownloadRecord(**{**fields, **changes})

    def magnet_record(self, task_id: str) -> DownloadRecord:
        return make_record(task_id).model_copy(update={"save_path": str(self.download_path)})


@pytest.fixture
def library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Library:
    lib = Library(tmp_path / "library", tmp_path / "downloads", capsys)
    lib.state_dir.mkdir(parents=True)
    lib.torrents_dir.mkdir(parents=True)
    return lib


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Payload]:
    root = tmp_path_factory.mktemp("payloads")
    return {
        name: make_payload(root, name, {"a.mkv": 40_000, "b.srt": 1_000}, piece_size=16384)
        for name in ("Alpha", "Beta", "Gamma")
    }


# --- a real daemon: its lock, and its .fastresume files ------------------------------------------


def resume_field(path: Path, key: bytes) -> int:
    """An integer of a .fastresume file, 0 while there is none."""
    try:
        resume = bdecode(path.read_bytes())
    except FileNotFoundError:
        return 0
    assert isinstance(resume, dict)
    value = resume.get(key, 0)
    assert isinstance(value, int)
    return value


@dataclass
class DaemonLibrary:
    daemon: Daemon
    root: Path
    download_path: Path
    done: Payload  # added with its files already in place: completes at once
    held: Payload  # added paused, second file only: nothing downloaded

    @property
    def state_file(self) -> Path:
        return Layout(self.root, self.download_path).state_file

    def resume_file(self, task_id: str) -> Path:
        return Layout(self.root, self.download_path).resume_path(task_id)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonLibrary]:
    """A running daemon holding two downloads, `done` (completed) and `held` (paused, file
    priorities [0, 1]), once it has written the .fastresume of both."""
    base = tmp_path_factory.mktemp("daemon")
    root, download_path = base / "library", base / "library" / "downloads"
    done = make_payload(download_path, "Done", {"a.mkv": 60_000, "b.srt": 900}, piece_size=16384)
    held = make_payload(base / "elsewhere", "Held", {"a.mkv": 50_000, "b.srt": 700})
    config = write_config(base / "etc", root, resume_save_interval=0.2)
    with running_daemon(config) as daemon, daemon.client() as client:
        client.call("subscribe")
        for task_id, payload, extra in (
            ("done", done, {}),
            ("held", held, {"paused": True, "file_priorities": [0, 1]}),
        ):
            torrent = base64.b64encode(payload.torrent).decode()
            client.call("add", task_id=task_id, torrent_b64=torrent, **extra)
        client.next_event("download.completed")
        running = DaemonLibrary(daemon, root, download_path, done, held)
        wait_for(
            lambda: resume_field(running.resume_file("done"), b"completed_time") > 0,
            "done.fastresume of the completed download",
        )
        wait_for(running.resume_file("held").exists, "held.fastresume")
        yield running


@pytest.mark.parametrize(
    "command",
    [["repair"], ["rebuild", "--force"], ["restore"], ["remove", "done"]],
    ids=["repair", "rebuild", "restore", "remove"],
)
def test_writing_commands_refuse_with_exit_3_while_the_daemon_runs(
    running: DaemonLibrary, command: list[str]
) -> None:
    before = running.state_file.read_bytes()
    result = subprocess.run(
        [str(STATE_EXECUTABLE), "--library-path", str(running.root), *command],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    lock = running.state_file.with_name("downloads.json.lock")
    assert result.stderr.strip() == (
        f"dlkeeper-state: another dlkeeper holds the state lock {lock}; stop the daemon first"
    )
    assert running.state_file.read_bytes() == before


def test_check_passes_on_the_library_of_a_running_daemon(
    running: DaemonLibrary, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--library-path", str(running.root), "check"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith(f"{running.state_file}: 2 downloads, no problems")


def test_rebuild_recreates_a_lost_state_from_the_daemons_files(
    running: DaemonLibrary, library: Library
) -> None:
    # A library whose state file is lost, over the daemon's download folder.
    library.download_path = running.download_path
    status, out, err = library.run("rebuild")
    assert status == 0, err
    rebuilt = library.read_state()
    store = StateStore(running.state_file.parent, MigrationContext(running.download_path))
    original = store.read()
    assert original is not None
    assert sorted(rebuilt) == ["done", "held"]
    for task_id, record in rebuilt.items():
        kept = original.downloads[task_id]
        assert (record.name, record.info_hash, record.save_path, record.torrent_file_path) == (
            kept.name,
            kept.info_hash,
            kept.save_path,
            kept.torrent_file_path,
        )
    assert rebuilt["done"].status is DownloadStatus.COMPLETED
    assert rebuilt["done"].progress == 1.0
    assert rebuilt["held"].status is DownloadStatus.PAUSED
    assert rebuilt["held"].file_priorities == (0, 1)
    assert rebuilt["held"].progress == 0.0
    assert "not recoverable from these files: peers, torrent_metadata" in out


def test_repair_recreates_a_lost_torrent_from_its_resume_data(
    running: DaemonLibrary, library: Library
) -> None:
    resume = running.resume_file("held").read_bytes()
    (library.torrents_dir / "held.fastresume").write_bytes(resume)
    record = library.torrent_record("held", running.held, status=DownloadStatus.PAUSED)
    library.write_state(record)
    (library.torrents_dir / "held.torrent").unlink()
    status, out, _ = library.run("check")
    assert status == 1
    assert "repair` first writes a lost .torrent back from its resume data" in out
    status, out, err = library.run("repair")
    assert status == 0, err
    recreated = read_torrent((library.torrents_dir / "held.torrent").read_bytes())
    assert (recreated.info_hash, recreated.name) == (running.held.info_hash, "Held")
    assert f"recreated {library.torrents_dir / 'held.torrent'} from its resume data" in out
    assert library.read_state() == {"held": record}
    assert not library.store().quarantine_path.exists()
    assert library.run("check")[0] == 0


# --- check --------------------------------------------------------------------------------------


def test_check_passes_when_every_download_can_be_resumed(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(
        library.torrent_record("alpha", payloads["Alpha"]), library.magnet_record("m1")
    )
    status, out, _ = library.run("check")
    assert status == 0
    assert out == f"{library.state_file}: 2 downloads, no problems\n"


def test_check_reports_a_deleted_state_file_and_how_to_recover(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]))
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]))  # makes a .bak
    library.state_file.unlink()
    status, out, _ = library.run("check")
    assert status == 1
    assert f"no state file at {library.state_file}" in out
    assert "`dlkeeper-state restore` puts back the backup" in out
    assert "`dlkeeper-state rebuild` recreates the state from the 1 .torrent/" in out


def test_check_reports_a_garbage_state_file(library: Library) -> None:
    library.state_file.write_bytes(b"\x00\x17 not json at all")
    status, out, _ = library.run("check")
    assert status == 1
    assert out.startswith(
        f"{library.state_file}: 1 problem\n  {library.state_file} does not load: not JSON"
    )


def test_check_reports_a_lost_torrent_that_leaves_a_download_unresumable(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]))
    (library.torrents_dir / "alpha.torrent").unlink()
    status, out, _ = library.run("check")
    assert status == 1
    assert (
        f"alpha: its .torrent {library.torrents_dir / 'alpha.torrent'} is missing; "
        "with no usable magnet link either, it cannot be resumed"
    ) in out
    assert "`dlkeeper-state repair`" in out


def test_check_json_lists_every_problem_and_whether_it_blocks_the_resume(
    library: Library, payloads: dict[str, Payload]
) -> None:
    outside = library.root / "not-downloads"
    library.write_state(
        library.torrent_record("lost", payloads["Alpha"], with_magnet=True),
        library.magnet_record("badmag").model_copy(update={"magnet_link": "magnet:?dn=x"}),
        library.torrent_record("wrong", payloads["Beta"], info_hash="0" * 40),
        library.torrent_record("away", payloads["Gamma"], save_path=str(outside)),
    )
    (library.torrents_dir / "lost.torrent").unlink()
    status, out, _ = library.run("check", "--json")
    assert status == 1
    report = orjson.loads(out)
    found = {(p["task_id"], p["resumable"]) for p in report["problems"]}
    assert found == {
        ("lost", True),  # its magnet still works
        ("badmag", False),
        ("wrong", False),
        ("away", True),  # outside download_path, and missing with 25% downloaded
    }
    messages = " ".join(p["message"] for p in report["problems"])
    assert f"is the torrent {payloads['Beta'].info_hash}, not {'0' * 40}" in messages
    assert f"outside download_path {library.download_path}" in messages
    assert report["ok"] is False


# --- repair -------------------------------------------------------------------------------------


def test_repair_quarantines_a_download_whose_torrent_is_lost_and_keeps_the_rest(
    library: Library, payloads: dict[str, Payload]
) -> None:
    lost = library.torrent_record("lost", payloads["Alpha"])
    kept = library.torrent_record("kept", payloads["Beta"])
    library.write_state(lost, kept)
    before = library.state_file.read_bytes()
    (library.torrents_dir / "lost.torrent").unlink()
    status, out, err = library.run("repair")
    assert status == 0, err
    assert library.read_state() == {"kept": kept}
    assert (library.state_dir / "downloads.json.bak").read_bytes() == before
    quarantine = orjson.loads(library.store().quarantine_path.read_bytes())
    assert quarantine["downloads"] == {"lost": orjson.loads(lost.to_json())}
    assert "cannot be resumed" in quarantine["reasons"]["lost"]["reason"]
    assert out.startswith("quarantined lost: ")


def test_repair_adds_to_the_quarantine_file_without_losing_earlier_entries(
    library: Library, payloads: dict[str, Payload]
) -> None:
    for name in ("Alpha", "Beta"):
        library.write_state(library.torrent_record("lost", payloads[name]))
        (library.torrents_dir / "lost.torrent").unlink()
        assert library.run("repair")[0] == 0
    quarantine = orjson.loads(library.store().quarantine_path.read_bytes())
    hashes = {key: entry["info_hash"] for key, entry in quarantine["downloads"].items()}
    assert hashes == {"lost": payloads["Alpha"].info_hash, "lost~2": payloads["Beta"].info_hash}
    assert set(quarantine["reasons"]) == {"lost", "lost~2"}


def test_repair_keeps_the_valid_downloads_of_a_file_with_one_invalid_entry(
    library: Library, payloads: dict[str, Payload]
) -> None:
    good = library.torrent_record("good", payloads["Alpha"])
    library.write_state(good)
    broken = orjson.loads(library.state_file.read_bytes())
    broken["downloads"]["bad"] = {"task_id": "bad", "status": "exploded"}
    damaged = orjson.dumps(broken)
    library.state_file.write_bytes(damaged)
    status, out, err = library.run("repair")
    assert status == 0, err
    assert library.read_state() == {"good": good}
    aside = list(library.state_dir.glob("downloads.json.corrupt-*"))
    assert [path.read_bytes() for path in aside] == [damaged]
    quarantine = orjson.loads(library.store().quarantine_path.read_bytes())
    assert quarantine["downloads"] == {"bad": {"task_id": "bad", "status": "exploded"}}
    assert f"the previous file is {aside[0].name}" in out


def test_repair_of_a_garbage_file_changes_nothing_and_points_to_restore(library: Library) -> None:
    library.state_file.write_bytes(b"{garbage")
    status, _, err = library.run("repair")
    assert status == 1
    assert err.startswith(f"dlkeeper-state: {library.state_file} cannot be repaired: not JSON")
    assert "`dlkeeper-state restore`" in err
    assert sorted(p.name for p in library.state_dir.iterdir()) == [
        "downloads.json",
        "downloads.json.lock",
    ]
    assert library.state_file.read_bytes() == b"{garbage"


# --- rebuild ------------------------------------------------------------------------------------


def test_rebuild_refuses_to_replace_a_state_file_that_loads(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]))
    before = library.state_file.read_bytes()
    status, out, err = library.run("rebuild")
    assert status == 1
    assert out.startswith(f"would rebuild 1 download from {library.torrents_dir}:\nalpha ")
    assert "--force replaces it" in err
    assert library.state_file.read_bytes() == before


def test_rebuild_with_force_keeps_the_replaced_file(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]), make_record("gone"))
    before = library.state_file.read_bytes()
    status, _, err = library.run("rebuild", "--force")
    assert status == 0, err
    assert list(library.read_state()) == ["alpha"]
    aside = list(library.state_dir.glob("downloads.json.before-rebuild-*"))
    assert [path.read_bytes() for path in aside] == [before]


def test_rebuild_sets_a_garbage_state_file_aside(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.torrent_record("alpha", payloads["Alpha"])  # leaves alpha.torrent in torrents/
    library.state_file.write_bytes(b"\xff\xfe garbage")
    status, _, err = library.run("rebuild")
    assert status == 0, err
    rebuilt = library.read_state()["alpha"]
    assert (rebuilt.info_hash, rebuilt.name) == (payloads["Alpha"].info_hash, "Alpha")
    assert rebuilt.status is DownloadStatus.QUEUED  # no resume data: nothing known downloaded
    aside = list(library.state_dir.glob("downloads.json.corrupt-*"))
    assert [path.read_bytes() for path in aside] == [b"\xff\xfe garbage"]


@pytest.mark.timeout(10)
def test_rebuild_while_the_backup_loads_starts_from_it_and_exits_0(
    library: Library, payloads: dict[str, Payload]
) -> None:
    record = library.torrent_record(
        "alpha", payloads["Alpha"], peers=("127.0.0.1:6881",), torrent_metadata={"id": 7}
    )
    magnet = library.magnet_record("m1")  # no file knows it: only the backup does
    library.write_state(record, magnet)
    library.write_state(record, magnet)  # the first file is now the .bak
    library.state_file.unlink()
    backup = (library.state_dir / "downloads.json.bak").read_bytes()
    status, out, err = library.run("rebuild")
    assert status == 0, err
    assert library.read_state() == {"alpha": record, "m1": magnet}
    assert out.startswith(
        f"rebuilt 2 downloads in {library.state_file} from {library.torrents_dir} and "
        "downloads.json.bak:\n"
    )
    assert "not recoverable" not in out
    assert (library.state_dir / "downloads.json.bak").read_bytes() == backup


def test_rebuild_survives_resume_data_with_a_time_no_calendar_holds(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.torrent_record("alpha", payloads["Alpha"])  # leaves alpha.torrent in torrents/
    beta = bytes.fromhex(payloads["Beta"].info_hash)
    (library.torrents_dir / "beta.fastresume").write_bytes(
        b"d10:added_timei" + str(10**30).encode() + b"e9:info-hash20:" + beta + b"e"
    )
    status, _, err = library.run("rebuild")
    assert status == 0, err
    rebuilt = library.read_state()
    assert sorted(rebuilt) == ["alpha", "beta"]
    assert rebuilt["beta"].info_hash == payloads["Beta"].info_hash


def test_rebuild_with_no_files_to_rebuild_from_exits_1(library: Library) -> None:
    status, _, err = library.run("rebuild")
    assert status == 1
    assert err == f"dlkeeper-state: nothing to rebuild from in {library.torrents_dir}\n"
    assert not library.state_file.exists()


# --- restore ------------------------------------------------------------------------------------


def test_restore_puts_the_backup_back_and_keeps_the_garbage_aside(
    library: Library, payloads: dict[str, Payload]
) -> None:
    record = library.torrent_record("alpha", payloads["Alpha"])
    library.write_state(record)
    library.write_state(record)  # the first write is now downloads.json.bak
    library.state_file.write_bytes(b"garbage")
    status, out, err = library.run("restore")
    assert status == 0, err
    assert library.read_state() == {"alpha": record}
    aside = list(library.state_dir.glob("downloads.json.before-restore-*"))
    assert [path.read_bytes() for path in aside] == [b"garbage"]
    assert out.startswith(f"restored 1 download from {library.state_dir / 'downloads.json.bak'}")


def test_restore_from_an_invalid_file_changes_nothing(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]))
    before = library.state_file.read_bytes()
    bad = library.root / "old-state.json"
    bad.write_bytes(b'{"version": 1, "downloads": {"x": {"task_id": "x"}}}')
    status, _, err = library.run("restore", "--from", str(bad))
    assert status == 1
    assert err.startswith(f"dlkeeper-state: not restored: {bad} is not a valid state file:")
    assert library.state_file.read_bytes() == before
    assert not list(library.state_dir.glob("downloads.json.before-restore-*"))


def test_restore_without_a_backup_exits_1(library: Library) -> None:
    status, _, err = library.run("restore")
    assert status == 1
    assert err == (
        f"dlkeeper-state: not restored: no backup at {library.state_dir / 'downloads.json.bak'}\n"
    )


# --- remove -------------------------------------------------------------------------------------


def test_remove_drops_one_download_and_keeps_its_entry_in_the_quarantine(
    library: Library, payloads: dict[str, Payload]
) -> None:
    alpha = library.torrent_record("alpha", payloads["Alpha"])
    beta = library.torrent_record("beta", payloads["Beta"])
    library.write_state(alpha, beta)
    status, out, err = library.run("remove", "alpha")
    assert status == 0, err
    assert library.read_state() == {"beta": beta}
    assert out.startswith("removed alpha (Alpha); its entry is kept in downloads.json.quarantine")
    assert library.run("remove", "beta")[0] == 0  # a second write: the .bak no longer has alpha
    quarantine = orjson.loads(library.store().quarantine_path.read_bytes())
    assert DownloadRecord.model_validate(quarantine["downloads"]["alpha"]) == alpha
    assert quarantine["reasons"]["alpha"]["reason"] == "removed by `dlkeeper-state remove`"
    assert sorted(quarantine["downloads"]) == ["alpha", "beta"]


def test_remove_of_an_unknown_id_exits_1_and_changes_nothing(
    library: Library, payloads: dict[str, Payload]
) -> None:
    library.write_state(library.torrent_record("alpha", payloads["Alpha"]))
    before = library.state_file.read_bytes()
    status, _, err = library.run("remove", "nope")
    assert status == 1
    assert err == f"dlkeeper-state: no download nope in {library.state_file}\n"
    assert library.state_file.read_bytes() == before
    assert not (library.state_dir / "downloads.json.bak").exists()


@pytest.mark.parametrize("command", [["repair"], ["rebuild"], ["restore"], ["remove", "x"]])
def test_a_writing_command_on_a_library_that_does_not_exist_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    mistyped = tmp_path / "no-such-library"
    status = main(["--library-path", str(mistyped), *command])
    assert status == 1
    assert capsys.readouterr().err == f"dlkeeper-state: no library folder at {mistyped}\n"
    assert not mistyped.exists()


def test_a_bad_config_exits_2_with_one_line(library: Library, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("shutdown_timeout = 'soon'\n")
    status = main(["--config", str(config), "check"])
    err = library.capsys.readouterr().err
    assert status == 2
    assert err.startswith("dlkeeper-state: config error: shutdown_timeout:")
    assert len(err.splitlines()) == 1


def test_the_daemon_resumes_a_state_rebuilt_after_losing_it_and_a_torrent(
    tmp_path: Path, library: Library
) -> None:
    library.root = tmp_path / "media"
    library.download_path = library.root / "downloads"
    payload = make_payload(tmp_path / "elsewhere", "Sintel", {"a.mkv": 50_000, "b.srt": 700})
    config = write_config(tmp_path / "etc", library.root, resume_save_interval=0.2)
    with running_daemon(config) as daemon, daemon.client() as client:
        torrent = base64.b64encode(payload.torrent).decode()
        client.call("add", task_id="s1", torrent_b64=torrent, paused=True, file_priorities=[1, 0])
        assert daemon.stop() == 0  # a clean stop saves the resume data
    for lost in [*library.state_dir.glob("downloads.json*"), library.torrents_dir / "s1.torrent"]:
        lost.unlink()
    status, _, err = library.run("rebuild")
    assert status == 0, err
    with running_daemon(config) as daemon, daemon.client() as client:
        info = client.call("get", task_id="s1")
        stats = client.call("stats")
    assert (info["status"], info["info_hash"]) == ("paused", payload.info_hash)
    assert [f["priority"] for f in info["files"]] == [1, 0]
    assert (stats["resumed_at_start"], stats["resume_failures"]) == (1, 0)


def test_a_state_folder_that_cannot_be_made_is_one_line_and_exit_1(library: Library) -> None:
    other = library.root / "other-library"
    other.mkdir()
    (other / "data").write_text("a file where the state folder should be")
    library.root = other
    status, _, err = library.run("rebuild")
    assert status == 1
    assert err.startswith(f"dlkeeper-state: cannot use the state folder {other / 'data'}:")
    assert len(err.splitlines()) == 1
