"""`dlkeeper`'s client commands as a user runs them: real processes against one real daemon and
one real seeder for the module, each test with task ids of its own."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.daemons import Daemon, write_config
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

pytestmark = pytest.mark.timeout(60)

DEADLINE = 20.0
# rich's console when the output is not a terminal: this width, no colour, no redrawing.
PLAIN = {"COLUMNS": "80", "TERM": "dumb"}
PAYLOADS = ("Downloaded", "Described", "Deleted", "Acked", "Watched")


@dataclass
class Library:
    """The module's daemon (a test may kill it and start another) and the seeder it fetches from."""

    config: Path
    daemon: Daemon
    seeder: Seeder
    payloads: dict[str, Payload]

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    def start_daemon(self) -> None:
        self.daemon = Daemon(self.config)
        self.daemon.wait_ready()

    def torrent_file(self, name: str, folder: Path) -> Path:
        path = folder / f"{name}.torrent"
        path.write_bytes(self.payloads[name].torrent)
        return path

    def wait_completed(self, task_id: str) -> dict[str, Any]:
        """The download.completed event of `task_id` (re-sent on subscribe until acked)."""
        with self.daemon.client() as client:
            client.call("subscribe")
            deadline = time.monotonic() + DEADLINE
            while True:
                event = client.next_event("download.completed", timeout=deadline - time.monotonic())
                if event["task_id"] == task_id:
                    return event


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Library]:
    root = tmp_path_factory.mktemp("cli")
    payloads = {
        name: make_payload(root / "seed", name, {f"{name.lower()}.mkv": 300_000, "info.nfo": 900})
        for name in PAYLOADS
    }
    with seeding(*payloads.values()) as seeder:
        config = write_config(root / "etc", root / "library")
        daemon = Daemon(config)
        library = Library(config, daemon, seeder, payloads)
        try:
            daemon.wait_ready()
            yield library
        finally:
            library.daemon.close()


def dlkeeper(
    *args: str, socket: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--socket", str(socket)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=cwd,
        env={**os.environ, **PLAIN, **(env or {})},
        check=False,
    )


def ok(*args: str, socket: Path, cwd: Path | None = None) -> str:
    """The stdout of a command that must succeed quietly."""
    result = dlkeeper(*args, socket=socket, cwd=cwd)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def task_ids(library: Library) -> list[str]:
    listed = json.loads(ok("ls", "--json", socket=library.socket))
    return [info["task_id"] for info in listed["downloads"]]


def fake_magnet(byte: str, name: str) -> str:
    return f"magnet:?xt=urn:btih:{byte * 20}&dn={name}"


# --- the one-shot commands ----------------------------------------------------------------------


def test_a_daemon_that_is_not_running_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    socket = tmp_path / "api.sock"
    result = dlkeeper("ls", socket=socket)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"no dlkeeper at {socket} — is the service running?\n"


def test_add_of_a_magnet_prints_the_task_id(library: Library) -> None:
    magnet = fake_magnet("1a", "Film")
    out = ok(
        "add",
        magnet,
        "--paused",
        "--task-id",
        "magnet-1",
        "--name",
        "A film",
        socket=library.socket,
    )
    assert out == "magnet-1\n"
    info = json.loads(ok("info", "magnet-1", "--json", socket=library.socket))
    assert (info["name"], info["status"], info["info_hash"]) == ("A film", "paused", "1a" * 20)


def test_add_of_a_relative_torrent_file_downloads_it(library: Library, tmp_path: Path) -> None:
    library.torrent_file("Downloaded", tmp_path)
    out = ok(
        "add", "Downloaded.torrent", "--task-id", "file-1", "--peer", library.seeder.peer,
        socket=library.socket, cwd=tmp_path,
    )  # fmt: skip
    assert out == "file-1\n"
    event = library.wait_completed("file-1")
    payload = library.payloads["Downloaded"]
    for file in event["files"]:
        content = (Path(event["save_path"]) / file["path"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == payload.file_hashes[file["path"]]


def test_info_shows_every_field_and_each_file(library: Library, tmp_path: Path) -> None:
    torrent = library.torrent_file("Described", tmp_path)
    ok("add", str(torrent), "--task-id", "info-1", "--paused", socket=library.socket)
    out = ok("info", "info-1", socket=library.socket)
    fields = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in out.split("\n\n")[0].splitlines()
    )
    assert list(fields) == [
        "task id", "name", "info hash", "status", "progress", "download rate", "upload rate",
        "peers", "ETA", "save path", "created at", "completed at", "error",
    ]  # fmt: skip
    assert fields["task id"] == "info-1"
    assert fields["info hash"] == library.payloads["Described"].info_hash
    assert fields["status"] == "paused"
    assert fields["completed at"] == "-"
    files = out.split("\n\n")[1].splitlines()
    assert files[0].split() == ["FILE", "SIZE", "PRIORITY"]
    assert set(files[1]) == {"─"}
    assert sorted(line.split()[:3] for line in files[2:]) == [
        ["Described/described.mkv", "293.0", "KiB"],
        ["Described/info.nfo", "900", "B"],
    ]


def test_ls_json_is_the_contract_list_result(library: Library) -> None:
    ok("add", fake_magnet("2b", "Listed"), "--paused", "--task-id", "json-1", socket=library.socket)
    printed = json.loads(ok("ls", "--json", socket=library.socket))
    with library.daemon.client() as client:
        listed = client.call("list")
    assert list(printed) == ["downloads"]
    mine = [info for info in printed["downloads"] if info["task_id"] == "json-1"]
    assert mine == [info for info in listed["downloads"] if info["task_id"] == "json-1"]


def test_ls_fits_80_columns_and_shows_each_download(library: Library) -> None:
    long_id = "a-task-id-far-longer-than-any-column-can-hold-" + "x" * 18
    ok(
        "add", fake_magnet("3c", "x"), "--paused", "--task-id", long_id,
        "--name", "A name that is much too long for an eighty column terminal to show",
        socket=library.socket,
    )  # fmt: skip
    ok("add", fake_magnet("4d", "Short"), "--paused", "--task-id", "short-1", socket=library.socket)
    lines = ok("ls", socket=library.socket).splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["ID", "NAME", "STATUS", "DONE", "SIZE", "RATE", "PEERS", "ETA"]
    assert ["short-1", "Short", "paused", "0%", "-", "-", "-", "-"] in [
        line.split() for line in lines
    ]
    [long_row] = [line for line in lines if line.startswith("a-task-id-far")]
    assert "…" in long_row and "paused" in long_row


def test_pause_and_resume_print_the_new_status(library: Library) -> None:
    ok(
        "add",
        fake_magnet("5e", "Paused"),
        "--paused",
        "--task-id",
        "pause-1",
        socket=library.socket,
    )
    assert ok("resume", "pause-1", socket=library.socket) == "pause-1: queued\n"
    assert ok("pause", "pause-1", socket=library.socket) == "pause-1: paused\n"
    assert json.loads(ok("info", "pause-1", "--json", socket=library.socket))["status"] == "paused"


def test_cancel_with_delete_files_removes_the_download_and_its_files(
    library: Library, tmp_path: Path
) -> None:
    torrent = library.torrent_file("Deleted", tmp_path)
    ok(
        "add",
        str(torrent),
        "--task-id",
        "cancel-1",
        "--peer",
        library.seeder.peer,
        socket=library.socket,
    )
    folder = Path(library.wait_completed("cancel-1")["save_path"]) / "Deleted"
    assert folder.is_dir()
    out = ok("cancel", "cancel-1", "--delete-files", socket=library.socket)
    assert out == "cancel-1: cancelled, its files deleted\n"
    result = dlkeeper("info", "cancel-1", socket=library.socket)
    assert (result.returncode, result.stderr) == (1, "dlkeeper: not_found: no download cancel-1\n")
    deadline = time.monotonic() + DEADLINE  # libtorrent deletes the files after the reply
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists()


def test_ack_of_a_completed_download_forgets_it_and_keeps_its_files(
    library: Library, tmp_path: Path
) -> None:
    torrent = library.torrent_file("Acked", tmp_path)
    ok(
        "add",
        str(torrent),
        "--task-id",
        "ack-1",
        "--peer",
        library.seeder.peer,
        socket=library.socket,
    )
    folder = Path(library.wait_completed("ack-1")["save_path"]) / "Acked"
    assert ok("ack", "ack-1", "--json", socket=library.socket) == "{}\n"
    assert "ack-1" not in task_ids(library)
    assert sorted(path.name for path in folder.iterdir()) == ["acked.mkv", "info.nfo"]


def test_stats_shows_the_daemons_counters(library: Library) -> None:
    printed = json.loads(ok("stats", "--json", socket=library.socket))
    with library.daemon.client() as client:
        stats = client.call("stats")
    # Free bytes move with whatever else writes to the disk meanwhile.
    assert {**printed, "uptime": 0, "free_bytes": 0} == {**stats, "uptime": 0, "free_bytes": 0}
    assert isinstance(printed["free_bytes"], int)
    assert printed["problems"] == []
    lines = ok("stats", socket=library.socket).splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "daemon", "uptime", "downloads", "resumed at start", "resume failures", "worker restarts",
        "free space", "problems",
    ]  # fmt: skip
    assert lines[0].endswith(f"dlkeeper 0.1.0 at {library.socket}")
    assert re.fullmatch(r"free space +[0-9.]+ [KMGT]?i?B", lines[-2]), lines[-2]
    assert re.fullmatch(r"problems +none", lines[-1]), lines[-1]


def test_a_refused_request_is_one_line_with_the_code_and_exit_1(library: Library) -> None:
    result = dlkeeper("add", "magnet:?xt=urn:btih:nonsense", socket=library.socket)
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.fullmatch(r"dlkeeper: invalid_magnet: [^\n]+\n", result.stderr)


def test_an_unreadable_torrent_file_is_one_line_and_adds_nothing(
    library: Library, tmp_path: Path
) -> None:
    before = task_ids(library)
    result = dlkeeper(
        "add", "missing.torrent", "--task-id", "missing-1", socket=library.socket, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr == (
        "dlkeeper: cannot read missing.torrent: No such file or directory "
        "(give a magnet: link or a .torrent file)\n"
    )
    assert task_ids(library) == before


def test_a_fifo_given_as_torrent_file_is_refused_at_once_not_waited_on(
    library: Library, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "fifo.torrent")  # no writer: a plain read would wait for good
    result = dlkeeper("add", "fifo.torrent", socket=library.socket, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("dlkeeper: cannot read fifo.torrent: ")
    assert "is not a regular file" in result.stderr


def test_a_torrent_file_too_large_to_send_is_given_to_the_daemon_by_absolute_path(
    library: Library, tmp_path: Path
) -> None:
    (tmp_path / "huge.torrent").write_bytes(b"x" * (6 * 1024 * 1024 + 1))
    result = dlkeeper("add", "huge.torrent", socket=library.socket, cwd=tmp_path)
    assert result.returncode == 1
    # The daemon read the file itself (it names it as it was given: absolute) and refused it.
    assert result.stderr == (
        f"dlkeeper: invalid_torrent: {tmp_path / 'huge.torrent'} is not a .torrent file\n"
    )


def test_a_bad_interval_is_a_usage_error_exit_2(tmp_path: Path) -> None:
    result = dlkeeper("watch", "--interval", "0", socket=tmp_path / "api.sock")
    assert result.returncode == 2
    assert "argument --interval: must be 0.05 to 86400 seconds, got 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "--help"], capture_output=True, text=True, check=True
    )
    listed = re.findall(r"^    (\w+)", result.stdout, flags=re.MULTILINE)
    assert listed == [
        "serve", "ls", "info", "add", "pause", "resume", "cancel", "ack", "retry", "stats", "watch",
        "demo",
    ]  # fmt: skip


# --- watch --------------------------------------------------------------------------------------


class Output:
    """Everything a child process writes to one stream, read by a thread, waited on by tests."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self._read = read
        self._text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, stream: IO[bytes]) -> Output:
        return cls(lambda: stream.read1(65536))  # type: ignore[attr-defined]

    def _pump(self) -> None:
        while True:
            try:
                chunk = self._read()
            except OSError:  # a pty's master reads EIO once the child has gone
                chunk = b""
            with self._changed:
                self._text += chunk.decode(errors="replace")
                self._changed.notify_all()
            if not chunk:
                return

    @property
    def text(self) -> str:
        with self._changed:
            return self._text

    def wait_for(self, pattern: str, after: int = 0) -> int:
        """Waits until `pattern` (a regex) appears past offset `after`; where its match ends."""
        deadline = time.monotonic() + DEADLINE
        with self._changed:
            while (found := re.compile(pattern, re.MULTILINE).search(self._text, after)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {pattern!r} in the output:\n{self._text[after:]}")
                self._changed.wait(remaining)
            return found.end()

    def wait_closed(self) -> None:
        self._thread.join(DEADLINE)


@pytest.fixture
def watcher(library: Library) -> Iterator[tuple[subprocess.Popen[bytes], Output]]:
    """`dlkeeper watch` writing to a pipe; its output is read as it comes."""
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "watch", "--socket", str(library.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **PLAIN, "COLUMNS": "100"},
    )
    try:
        assert process.stdout is not None
        yield process, Output.of(process.stdout)
    finally:
        process.kill()
        process.wait(DEADLINE)


def test_watch_carries_on_across_a_daemon_sigkill_and_restart(
    library: Library, tmp_path: Path, watcher: tuple[subprocess.Popen[bytes], Output]
) -> None:
    process, output = watcher
    torrent = library.torrent_file("Watched", tmp_path)
    ok(
        "add",
        str(torrent),
        "--task-id",
        "watch-1",
        "--paused",
        "--peer",
        library.seeder.peer,
        socket=library.socket,
    )
    seen = output.wait_for(r"^\d\d:\d\d:\d\d  watch-1  paused  0%  Watched$")
    library.daemon.kill()
    seen = output.wait_for(f"  dlkeeper at {library.socket} went away — reconnecting…$", seen)
    library.start_daemon()
    seen = output.wait_for(f"  reconnected to dlkeeper at {library.socket}$", seen)
    ok("resume", "watch-1", socket=library.socket)
    output.wait_for(r"^\d\d:\d\d:\d\d  watch-1  completed  100%  Watched$", seen)
    process.send_signal(signal.SIGINT)
    assert process.wait(DEADLINE) == 0
    assert process.stderr is not None
    assert process.stderr.read() == b""


@pytest.mark.parametrize("change", [True, False], ids=["then-a-change", "then-nothing"])
def test_watch_ends_quietly_when_the_reader_of_its_pipe_goes_away(
    library: Library, change: bool
) -> None:
    task_id = f"pipe-{int(change)}"
    digit = "7a" if change else "7b"
    ok("add", fake_magnet(digit, "Piped"), "--paused", "--task-id", task_id, socket=library.socket)
    reader, writer = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "watch", "--socket", str(library.socket)],
        stdout=writer, stderr=subprocess.PIPE, env={**os.environ, **PLAIN},
    )  # fmt: skip
    os.close(writer)
    try:
        read = b""
        deadline = time.monotonic() + DEADLINE
        while f"{task_id}  paused".encode() not in read:
            # Read here, not by an `Output` thread: a closed pipe must have no reader left.
            ready, _, _ = select.select([reader], [], [], deadline - time.monotonic())
            assert ready, f"no line for {task_id} in {read!r}"
            read += os.read(reader, 65536)
        os.close(reader)  # `| head` has read enough; the next change is written to no one
        if change:
            ok("resume", task_id, socket=library.socket)
        # else nothing is ever written again: watch must notice the closed pipe by itself
        assert process.wait(DEADLINE) == 128 + signal.SIGPIPE
        assert process.stderr is not None
        assert process.stderr.read() == b""
    finally:
        process.kill()
        process.wait(DEADLINE)


def test_watch_on_a_terminal_draws_a_bar_for_each_download(library: Library) -> None:
    ok("add", fake_magnet("6f", "Drawn"), "--paused", "--task-id", "drawn-1", socket=library.socket)
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "watch", "--socket", str(library.socket)],
        stdin=terminal, stdout=terminal, stderr=terminal, env=env,
    )  # fmt: skip
    os.close(terminal)
    try:
        output = Output(lambda: os.read(controller, 65536))
        # The bar row of the paused magnet: its name, an empty bar, 0 % and its status.
        output.wait_for(r"Drawn +\x1b\[[0-9;]*m━+\x1b\[0m +0% +\x1b\[[0-9;]*mpaused")
        process.send_signal(signal.SIGINT)
        assert process.wait(DEADLINE) == 0
        output.wait_closed()
        assert "Traceback" not in output.text
    finally:
        process.kill()
        process.wait(DEADLINE)
        os.close(controller)
