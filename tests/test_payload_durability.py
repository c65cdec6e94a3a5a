"""Payload durability (CONTRACT.md sections 2 and 3): the bytes a `.fastresume` claims, and every
file of a `completed` download, are fsynced before that `.fastresume` is renamed into place and
before the state write that records `completed`; a payload fsync that fails keeps both back,
says so in `problems`, and is retried until it works."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt
import pytest

from actors.atomic import fsync_files
from tests.api import (
    NO_QUEUE,
    Library,
    Served,
    add_torrent,
    new_payload,
    seeding_now,
    subscribe,
    wait_event,
    wait_until,
)
from tests.daemons import DEADLINE, Daemon, layout_of, write_config
from tests.test_stop import children
from tests.torrents import Payload

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="needs strace (.ci/run installs it)")

MiB = 1024 * 1024
FILES = {"a.bin": 3 * MiB, "sub/b.bin": MiB, "sub/deeper/c.bin": 300_000}


def payload_paths(download_path: Path, payload: Payload) -> list[str]:
    return [str(download_path / relative) for relative in payload.file_hashes]


def claims_every_piece(resume: Path, payload: Payload) -> bool:
    """Whether the .fastresume at `resume` exists and says every piece is downloaded."""
    if not resume.exists():
        return False
    have = lt.read_resume_data(resume.read_bytes()).have_pieces
    return sum(1 for piece in have if piece) == lt.torrent_info(payload.torrent).num_pieces()


def hashes_match(download_path: Path, payload: Payload) -> bool:
    return all(
        (download_path / relative).is_file()
        and hashlib.sha256((download_path / relative).read_bytes()).hexdigest() == expected
        for relative, expected in payload.file_hashes.items()
    )


# --- reading an strace log ------------------------------------------------------------------


@dataclass
class Trace:
    """What `strace -f -y -s N -e trace=fsync,fdatasync,rename*,write` logged, in order:
    successful fsyncs by path (their completion), renames (their start), and for each
    temporary file the last bytes written to it."""

    fsynced: list[tuple[int, str]] = field(default_factory=list)
    renamed: list[tuple[int, str, str, str]] = field(default_factory=list)  # at, from, to, bytes


_FD_PATH = re.compile(r"^\d+<(?P<path>[^>]*)>")
_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*)$")
_RESUMED = re.compile(r"^(?P<pid>\d+)\s+<\.\.\. (?P<name>\w+) resumed>(?P<rest>.*)$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def read_trace(path: Path) -> Trace:
    trace = Trace()
    pending: dict[str, tuple[str, str]] = {}  # pid -> (call, its arguments so far)
    last_write: dict[str, str] = {}  # temporary file -> what was last written to it
    for index, raw in enumerate(path.read_text(errors="replace").splitlines()):
        resumed = _RESUMED.match(raw)
        if resumed:
            name, args = pending.pop(resumed["pid"], (resumed["name"], ""))
            _finish(trace, last_write, index, name, args + resumed["rest"], started=None)
            continue
        call = _CALL.match(raw)
        if not call:
            continue
        if call["args"].endswith("<unfinished ...>"):
            pending[call["pid"]] = (call["name"], call["args"].removesuffix("<unfinished ...>"))
            if call["name"].startswith("rename"):  # a rename counts from its start
                _finish(trace, last_write, index, call["name"], call["args"], started=index)
            continue
        _finish(trace, last_write, index, call["name"], call["args"], started=index)
    return trace


def _finish(
    trace: Trace,
    last_write: dict[str, str],
    index: int,
    name: str,
    args: str,
    *,
    started: int | None,
) -> None:
    if name in ("fsync", "fdatasync"):
        fd = _FD_PATH.match(args)
        if fd and re.search(r"\)\s+=\s+0\s*$", args):
            trace.fsynced.append((index, fd["path"]))
    elif name == "write":
        fd = _FD_PATH.match(args)
        if fd and fd["path"].endswith(".tmp"):
            quoted = _QUOTED.search(args)
            last_write[fd["path"]] = quoted.group(1) if quoted else ""
    elif name.startswith("rename") and started is not None:
        names = _QUOTED.findall(args)
        if len(names) >= 2:
            source, target = names[0], names[-1]
            trace.renamed.append((started, source, target, last_write.get(source, "")))


def first_fsync_of(trace: Trace, path: str) -> int | None:
    return next((index for index, synced in trace.fsynced if synced == path), None)


def strace_daemon(config: Path, trace: Path, *extra: str) -> Daemon:
    assert STRACE is not None
    calls = "fsync,fdatasync,rename,renameat,renameat2,write"
    prefix = [STRACE, "-f", "-y", "-qq", "-s", "65536", "-o", str(trace), "-e", f"trace={calls}"]
    return Daemon(config, command_prefix=[*prefix, *extra])


def traced_pid(daemon: Daemon) -> int:
    (pid,) = wait_until(lambda: children(daemon.process.pid), "the daemon under strace")
    return pid


@contextlib.contextmanager
def closing(daemon: Daemon) -> Iterator[Daemon]:
    try:
        yield daemon
    finally:
        tracee = children(daemon.process.pid)
        daemon.close()  # strace is started with the daemon: its end takes the daemon along
        for pid in tracee:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@needs_strace
@pytest.mark.timeout(90)
def test_every_file_is_fsynced_before_its_fastresume_and_before_completed_is_saved(
    tmp_path: Path,
) -> None:
    library = tmp_path / "library"
    config = write_config(tmp_path, library, libtorrent=NO_QUEUE, resume_save_interval=1)
    layout = layout_of(config)
    payload = new_payload(tmp_path, FILES)
    trace_file = tmp_path / "strace.log"
    with seeding_now(payload) as seeder, closing(strace_daemon(config, trace_file)) as daemon:
        daemon.wait_ready()
        pid = traced_pid(daemon)
        with daemon.client() as client:
            task_id = add_torrent(client, payload, task_id="durable", peers=[seeder.peer])[
                "task_id"
            ]

            def completed_and_resume_kept() -> bool:
                resume = layout.resume_path(task_id)
                return client.call("get", task_id=task_id)[
                    "status"
                ] == "completed" and claims_every_piece(resume, payload)

            wait_until(completed_and_resume_kept, "the download to complete", timeout=60)
        os.kill(pid, signal.SIGTERM)
        assert daemon.process.wait(DEADLINE) == 0  # strace's status: the daemon's
    assert hashes_match(layout.download_path, payload)
    trace = read_trace(trace_file)
    resume = str(layout.resume_path(task_id))
    resume_renames = [at for at, _, target, _ in trace.renamed if target == resume]
    assert resume_renames, "no .fastresume was renamed into place"
    state = str(layout.state_file)
    completed_writes = [
        at
        for at, _, target, written in trace.renamed
        if target == state and '\\"status\\":\\"completed\\"' in written
    ]
    assert completed_writes, "no state write recorded completed"
    for path in payload_paths(layout.download_path, payload):
        synced = first_fsync_of(trace, path)
        assert synced is not None, f"{path} was never fsynced"
        assert synced < resume_renames[-1], f"{path} fsynced after its last .fastresume"
        assert synced < completed_writes[0], f"{path} fsynced after completed was saved"
    # The folders libtorrent made hold new names: fsynced too.
    for folder in ("sub", "sub/deeper"):
        path = str(layout.download_path / payload.name / folder)
        synced = first_fsync_of(trace, path)
        assert synced is not None and synced < completed_writes[0], f"{path} not fsynced"


def attached(pid: int) -> bool:
    """Whether every thread of `pid` is traced."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            status = (task / "status").read_text()
            if re.search(r"^TracerPid:\s+0$", status, re.MULTILINE):
                return False
    return bool(tasks)


@contextlib.contextmanager
def failing_fsync(pid: int, path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Every fsync of `path` by any thread of `pid` fails with EIO until the block ends (or
    the process it yields is stopped): strace attached to the running process, then detached."""
    assert STRACE is not None
    command = [STRACE, "-f", "-qq", "-o", "/dev/null", "-p", str(pid), "-P", str(path)]
    command += ["-e", "trace=fsync", "-e", "inject=fsync:error=EIO"]
    tracer = subprocess.Popen(command)
    try:
        wait_until(lambda: attached(pid), "strace to attach")
        yield tracer
    finally:
        tracer.terminate()  # detaches: fsync works again
        try:
            tracer.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(DEADLINE)


@needs_strace
@pytest.mark.timeout(90)
def test_a_failing_payload_fsync_keeps_back_the_fastresume_and_the_completion_until_it_works(
    tmp_path: Path,
) -> None:
    library = tmp_path / "library"
    config = write_config(tmp_path, library, libtorrent=NO_QUEUE, resume_save_interval=3600)
    layout = layout_of(config)
    payload = new_payload(tmp_path, FILES)
    failing = layout.download_path / next(iter(payload.file_hashes))
    resume = layout.resume_path("eio")
    daemon = Daemon(config)
    with seeding_now(payload) as seeder, closing(daemon):
        daemon.wait_ready()
        served = Served(daemon, Library(library, config), time.monotonic())
        with daemon.client() as client, subscribe(served) as events:
            with failing_fsync(daemon.process.pid, failing) as tracer:
                add_torrent(client, payload, task_id="eio", peers=[seeder.peer])

                def two_problems() -> list[str] | None:
                    problems: list[str] = client.call("ping")["problems"]
                    return problems if len(problems) == 2 else None

                # The finish, then the resume data saved on finish: neither can be kept.
                problems = wait_until(two_problems, "the fsync failures to be problems")
                assert all("eio" in problem for problem in problems), problems
                assert any("Input/output error" in problem for problem in problems), problems
                assert not resume.exists(), "resume data kept while its bytes are not durable"
                assert client.call("get", task_id="eio")["status"] != "completed"
                assert tracer.poll() is None, "strace gave up"
                time.sleep(1.5)  # a retry or two meanwhile (backoff from 0.5 s): still failing
                assert not resume.exists()
                assert client.call("get", task_id="eio")["status"] != "completed"
                assert len(client.call("stats")["problems"]) == 2
            # fsync works again: the retry keeps both, and the problems end.
            wait_event(events, "download.completed", "eio", timeout=40)
            wait_until(lambda: claims_every_piece(resume, payload), "the resume data to be kept")
            wait_until(lambda: client.call("ping")["problems"] == [], "the problems to end")
            assert client.call("get", task_id="eio")["status"] == "completed"
    assert hashes_match(layout.download_path, payload)
    assert daemon.log.read_text().count("problem over") == 2


@pytest.mark.timeout(10)
def test_fsync_files_syncs_the_regular_files_and_skips_what_is_missing_a_fifo_or_a_symlink(
    tmp_path: Path,
) -> None:
    root = tmp_path / "downloads"
    (root / "Release" / "sub").mkdir(parents=True)
    kept = [root / "Release" / "a.bin", root / "Release" / "sub" / "b.bin"]
    for path in kept:
        path.write_bytes(b"x" * 1000)
    fifo = root / "Release" / "fifo"
    os.mkfifo(fifo)  # an open for reading would wait for a writer forever
    link = root / "Release" / "link"
    link.symlink_to(kept[0])
    missing = root / "Release" / "never-written.bin"
    paths = [str(path) for path in (*kept, fifo, link, missing)]
    assert fsync_files(paths, root=str(root)) == len(kept)
