"""Crash consistency of the persistence actor under real SIGKILLs.

A zygote process (`tests.crash_child`) forks, for each of `KILLS` rounds, a child that runs the
persistence actor on one library folder and mutates records from several concurrent workers,
reporting each mutation before sending it (`intent`) and after its reply (`ack`). The test kills
the child at a random moment, then checks that `downloads.json` parses and holds the state the
previous round left, plus every acknowledged mutation, plus at most each worker's one mutation
in flight. The verified file is the baseline of the next round, which loads it. Workers reuse a
fixed set of task ids, so the file stays small however many rounds run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from actors.errors import CorruptState
from actors.layout import STATE_FILE_NAME
from actors.messages.persistence import RecordChanges
from actors.state import CURRENT_VERSION, DownloadRecord, decode_state
from tests.crash_child import Command, migration_context, owner_of

REPO_ROOT = Path(__file__).resolve().parent.parent
KILLS = 200
WORKERS = 6
MAX_KILL_DELAY = 0.060
# Deadlines for one step each, generous for a loaded CI machine; a hang fails with its name.
READY_DEADLINE = 30.0  # the zygote's imports
START_DEADLINE = 10.0  # fork, event loop, lock, load
EXIT_DEADLINE = 10.0  # SIGKILL to reaped

log = logging.getLogger(__name__)


class LineReader:
    """Complete lines from a non-blocking pipe or FIFO, collected as they arrive."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.lines: deque[bytes] = deque()
        self.eof = False
        self._partial = b""

    def pump(self) -> None:
        """Reads everything available now."""
        while not self.eof:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            self.lines.extend(complete)

    @property
    def unterminated(self) -> bytes:
        return self._partial


def pump_until(readers: Sequence[LineReader], until: float, done: Callable[[], bool]) -> bool:
    """Reads from `readers` as data arrives until `done()` (True) or the clock reaches `until`."""
    while not done():
        remaining = until - time.monotonic()
        live = [reader for reader in readers if not reader.eof]
        if remaining <= 0 or not live:
            return False
        ready, _, _ = select.select([reader.fd for reader in live], [], [], remaining)
        for reader in live:
            if reader.fd in ready:
                reader.pump()
    return True


class Zygote:
    """The forking helper process and the one child it may have alive."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin: IO[bytes] = process.stdin
        self.output = LineReader(process.stdout.fileno())
        self._log_path = log_path
        self.child: int | None = None
        self.expect("ready", READY_DEADLINE)

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """The zygote's next message, which must carry `key`."""
        pump_until([self.output], time.monotonic() + timeout, lambda: bool(self.output.lines))
        assert self.output.lines, f"no {key!r} from the zygote within {timeout} s{self.log()}"
        message: dict[str, Any] = json.loads(self.output.lines.popleft())
        assert key in message, f"expected {key!r} from the zygote, got {message}{self.log()}"
        return message

    def fork(self, command: Command) -> int:
        self._stdin.write(command.to_line())
        self._stdin.flush()
        pid: int = self.expect("pid", START_DEADLINE)["pid"]
        self.child = pid
        return pid

    def wait_exited(self, pid: int) -> int:
        """The child's exit code once the zygote has reaped it (so its lock and FIFO are closed)."""
        message = self.expect("exited", EXIT_DEADLINE)
        assert message["exited"] == pid, message
        self.child = None
        status: int = message["status"]
        return status

    def log(self) -> str:
        text = self._log_path.read_text(errors="replace")[-4000:]
        return f"\n--- zygote and child stderr ---\n{text}" if text else ""

    def close(self) -> None:
        if self.child is not None:
            # Gone already if it crashed; else the zygote waits on it and would never exit.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        self._stdin.close()
        try:
            self._process.wait(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        finally:
            assert self._process.stdout is not None
            self._process.stdout.close()


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[Zygote]:
    log_path = tmp_path / "zygote.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_child"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        helper = Zygote(process, log_path)
    except BaseException:
        process.kill()
        process.wait()
        raise
    try:
        yield helper
    finally:
        helper.close()


@dataclass(frozen=True)
class Mutation:
    """One reported mutation, applied by the test's own model of the state."""

    worker: int
    number: int
    op: str
    task_id: str
    record: DownloadRecord | None = None
    changes: RecordChanges | None = None

    @classmethod
    def from_intent(cls, intent: dict[str, Any]) -> Mutation:
        record = intent.get("record")
        changes = intent.get("changes")
        return cls(
            worker=intent["w"],
            number=intent["n"],
            op=intent["op"],
            task_id=intent["task_id"],
            record=None if record is None else DownloadRecord.model_validate(record),
            changes=None if changes is None else RecordChanges.model_validate(changes),
        )

    def apply(self, downloads: dict[str, DownloadRecord]) -> None:
        """Applies the mutation; the child may only have sent it if it fits the verified state."""
        current = downloads.get(self.task_id)
        assert (current is None) == (self.op == "add"), (
            f"worker {self.worker} sent {self.op} #{self.number} for {self.task_id}, which the "
            f"verified state {'lacks' if current is None else 'has'}: the child loaded another"
        )
        if self.op == "add":
            assert self.record is not None
            downloads[self.task_id] = self.record
        elif self.op == "update":
            assert current is not None and self.changes is not None
            updated = current.model_dump() | self.changes.changed()
            downloads[self.task_id] = DownloadRecord.model_validate(updated)
        else:
            assert self.op == "remove", self.op
            del downloads[self.task_id]


@dataclass
class WorkerReports:
    """What one worker reported: its acknowledged mutations in order, and the one in flight."""

    acked: list[Mutation] = field(default_factory=list)
    in_flight: Mutation | None = None


def parse_reports(lines: Sequence[bytes]) -> dict[int, WorkerReports]:
    assert lines and json.loads(lines[0]) == {"t": "started"}, lines[:1]
    workers: dict[int, WorkerReports] = {}
    for line in lines[1:]:
        report: dict[str, Any] = json.loads(line)
        worker = workers.setdefault(report["w"], WorkerReports())
        expected_number = len(worker.acked)
        assert report["n"] == expected_number, f"worker {report['w']} out of order: {report}"
        if report["t"] == "intent":
            assert worker.in_flight is None, (
                f"two mutations in flight: {worker.in_flight}, {report}"
            )
            mutation = Mutation.from_intent(report)
            assert owner_of(mutation.task_id) == mutation.worker, report
            worker.in_flight = mutation
        else:
            assert report["t"] == "ack" and worker.in_flight is not None, report
            worker.acked.append(worker.in_flight)
            worker.in_flight = None
    return workers


def decode_file(path: Path, state_dir: Path) -> dict[str, DownloadRecord] | None:
    """The downloads in `path`, None if there is no such file; raises `CorruptState`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    decoded = decode_state(raw, path, migration_context(state_dir))
    assert decoded.from_version == CURRENT_VERSION, decoded.from_version
    return decoded.downloads


def read_state(state_dir: Path) -> dict[str, DownloadRecord] | None:
    """The downloads in `downloads.json` (None if there is none), decoded without repairing
    anything; asserts that it and its `.bak` parse."""
    path = state_dir / STATE_FILE_NAME
    backup = state_dir / f"{STATE_FILE_NAME}.bak"
    backup_error: CorruptState | None = None
    try:
        decode_file(backup, state_dir)
    except CorruptState as exc:
        backup_error = exc
    try:
        downloads = decode_file(path, state_dir)
    except CorruptState as exc:
        backup_state = "it parses" if backup_error is None else f"neither ({backup_error})"
        raise AssertionError(
            f"{path.name} does not parse after a SIGKILL: {exc}; its .bak: {backup_state}. "
            "A SIGKILL leaves the page cache intact, so only a broken write can cause this."
        ) from None
    # The .bak is a link to an earlier complete file, never a partial one.
    assert backup_error is None, f"{backup.name} does not parse after a SIGKILL: {backup_error}"
    return downloads


@dataclass
class Tally:
    """Evidence that the kills hit the interesting moments."""

    acks: int = 0
    landed: int = 0  # in-flight mutations found in the file (written, not yet acknowledged)
    not_landed: int = 0  # in-flight mutations not in the file
    mid_write: int = 0  # kills that left a write's temporary file behind

    def __str__(self) -> str:
        return (
            f"{self.acks} acks, in flight: {self.landed} landed, {self.not_landed} not landed; "
            f"{self.mid_write} of {KILLS} kills mid-write"
        )


def check_state(
    state_dir: Path,
    baseline: dict[str, DownloadRecord],
    workers: dict[int, WorkerReports],
    tally: Tally,
) -> dict[str, DownloadRecord]:
    """Asserts the file after a kill is the baseline plus every ack (plus at most what was in
    flight), and returns it as the next baseline."""
    found = read_state(state_dir)
    assert found is not None or not baseline, f"{STATE_FILE_NAME} vanished"
    actual = found or {}
    acked = dict(baseline)
    for worker in workers.values():
        for mutation in worker.acked:
            mutation.apply(acked)
        tally.acks += len(worker.acked)
    in_flight = [w.in_flight for w in workers.values() if w.in_flight is not None]
    for mutation in in_flight:
        without = acked.get(mutation.task_id)
        with_it = dict(acked)
        mutation.apply(with_it)
        landed = with_it.get(mutation.task_id)
        got = actual.get(mutation.task_id)
        assert got in (without, landed), (
            f"{mutation.task_id} is neither as acknowledged nor as after the in-flight "
            f"{mutation}:\nfile: {got}\nacknowledged: {without}\nwith in-flight: {landed}"
        )
        if without != landed:
            if got == landed:
                tally.landed += 1
            else:
                tally.not_landed += 1
    in_flight_ids = {mutation.task_id for mutation in in_flight}
    settled = {key: r for key, r in actual.items() if key not in in_flight_ids}
    assert settled == {key: r for key, r in acked.items() if key not in in_flight_ids}, (
        "the file (left) is not the previous state plus every acknowledged mutation (right)"
    )
    return actual


def kill_one_child(
    zygote: Zygote, command: Command, fifo_path: Path, kill_delay: float
) -> list[bytes]:
    """Forks a child, kills it `kill_delay` s after it started, and returns all it reported."""
    os.mkfifo(fifo_path)
    # Opened non-blocking before the fork, so the child's open for writing never waits.
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        reports = LineReader(fifo)
        pid = zygote.fork(command)
        pump_until(
            [reports, zygote.output],
            time.monotonic() + START_DEADLINE,
            lambda: bool(reports.lines or zygote.output.lines),
        )
        assert reports.lines, f"child {pid} did not start{zygote.log()}"
        # The one wait that is not on an event: the random moment of the kill. Reports are
        # read meanwhile so the child never blocks on a full pipe.
        pump_until([reports], time.monotonic() + kill_delay, lambda: False)
        os.kill(pid, signal.SIGKILL)
        status = zygote.wait_exited(pid)
        assert status == -signal.SIGKILL, f"child {pid} ended with {status}{zygote.log()}"
        reports.pump()  # every writer is gone: the rest of the FIFO, then EOF
        assert reports.eof and not reports.unterminated, reports.unterminated
        return list(reports.lines)
    finally:
        os.close(fifo)
        fifo_path.unlink()


@pytest.mark.timeout(120)
def test_acknowledged_mutations_survive_sigkill(zygote: Zygote, tmp_path: Path) -> None:
    seed = int(os.environ.get("DLKEEPER_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    state_dir = tmp_path / "library" / "data"
    state_dir.mkdir(parents=True)
    baseline: dict[str, DownloadRecord] = {}
    tally = Tally()
    for iteration in range(KILLS):
        command = Command(str(state_dir), str(tmp_path / "reports.fifo"), seed, iteration, WORKERS)
        try:
            lines = kill_one_child(
                zygote, command, tmp_path / "reports.fifo", rng.uniform(0, MAX_KILL_DELAY)
            )
            if any(state_dir.glob(f".{STATE_FILE_NAME}.*.tmp")):
                tally.mid_write += 1
            baseline = check_state(state_dir, baseline, parse_reports(lines), tally)
        except AssertionError as error:
            error.add_note(f"at kill {iteration}; to rerun: DLKEEPER_CRASH_SEED={seed}")
            raise
    log.info("seed %d: %s", seed, tally)
    # Without these the kills proved little: they must hit writes and the ack window.
    assert tally.acks > KILLS, tally
    assert tally.landed > 0 and tally.not_landed > 0, tally
    assert tally.mid_write > 0, tally
