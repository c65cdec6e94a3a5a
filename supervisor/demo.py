"""`dlkeeper demo`: shows, with no network and no setup, that a download survives a SIGKILL of the
daemon and resumes where it was without re-checking its files.

In a temporary folder it writes a 48 MiB payload, seeds it from a libtorrent seeder on 127.0.0.1
(`python -m supervisor.demo_swarm`, slowed down so that the kill lands part-way), starts a real
`dlkeeper serve` on a temporary library, adds the download, kills the daemon with SIGKILL near
half-way, starts it again and checks that it picked up from its resume data, lets it finish,
compares every file's SHA-256 with the payload's, acks the completion and stops the daemon.
Every claim is checked; the first that does not hold ends the demo with exit status 1 and a
one-line reason. Every process it started is gone when it returns, and so is the folder unless
`keep`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from actors.errors import DlkeeperError, leaves
from actors.metainfo import bdecode
from supervisor import exits
from supervisor.client import (
    DlkeeperClient,
    DownloadCompletedEvent,
    DownloadFailedEvent,
    DownloadInfo,
    DownloadProgressEvent,
)
from supervisor.loopback import LOOPBACK_SETTINGS

if TYPE_CHECKING:
    from anyio.abc import Process, UNIXDatagramSocket
    from rich.console import Console
    from rich.progress import Progress, TaskID


MiB = 1024 * 1024
TASK_ID = "demo"
SEEDER_RATE = 6 * MiB  # bytes/s: the 48 MiB payload takes about 8 s, time to kill it part-way
RESUME_SAVE_INTERVAL = 1.0  # seconds: the kill finds resume data at most about this old
KILL_AT = 0.5  # the daemon is killed once the download passes this share...
KILL_WINDOW = (0.3, 0.7)  # ...and the demo fails if the kill did not land within this one
# A periodic save requested just before the kill may not be on disk yet: allow one more interval
# and a second for the worker's disk flush on a busy machine.
MAX_RESUME_AGE = 2 * RESUME_SAVE_INTERVAL + 1.0
PROGRESS_INTERVAL = 0.2  # seconds between the daemon's progress events
STEP_TIMEOUT = 30.0  # no step of the demo takes longer on a healthy machine
STOP_TIMEOUT = 15.0  # a clean stop: resume data (shutdown_timeout 5 s) and the state flush
MAX_SOCKET_PATH = 100  # a Unix socket path is at most 107 bytes; keep a margin

# What the daemon logs when it cannot use a download's resume data, and so checks its files.
RESUME_PROBLEMS = (
    "resume data rejected",
    "resume data unreadable",
    "resume data is of another torrent",
    ".fastresume ignored",
)


class DemoFailed(Exception):
    """A step failed or a claim did not hold; the message is the one-line reason."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived."""


@dataclass
class Payload:
    """What the seeder reported: its port, the .torrent, and the SHA-256 of every file."""

    port: int
    torrent: bytes
    name: str
    total_bytes: int
    piece_count: int
    files: dict[str, str]


@dataclass
class Findings:
    """The measurements the summary shows."""

    payload_ready: float = 0.0
    first_ready: float = 0.0
    second_ready: float = 0.0
    at_kill: float = 0.0
    resume_saved: float = 0.0
    resume_age: float = 0.0
    after_restart: float = 0.0
    state_file_progress: float = 0.0
    statuses_after_restart: list[str] = field(default_factory=list)
    finished_after_restart: float = 0.0
    files_verified: int = 0


# --- processes -----------------------------------------------------------------------------------


def _process_identity(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it is gone.

    The start time tells a process from a later one that got the same pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[19])


def _children_of(parent: int) -> dict[int, int]:
    """The live child processes of `parent` (pid -> start time); empty where /proc is missing."""
    found: dict[int, int] = {}
    with suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                identity = _process_identity(int(entry.name))
                if identity is not None and identity[1] == parent and identity[0] not in "ZX":
                    found[int(entry.name)] = identity[2]
    return found


def _still_running(pid: int, started: int) -> bool:
    identity = _process_identity(pid)
    return identity is not None and identity[2] == started and identity[0] not in "ZX"


class Children:
    """Every process the demo starts. `aclose()` kills and reaps every one that is left, and waits
    for the libtorrent workers of the daemons (grandchildren) to exit, killing any that linger."""

    def __init__(self) -> None:
        self._processes: list[Process] = []
        self._workers: dict[int, int] = {}  # pid -> start time

    async def start(self, command: list[str], log: Path, **options: Any) -> Process:
        """Starts `command` with its stderr appended to `log`."""
        with log.open("ab") as stderr:
            # A session of its own: a Ctrl-C in the terminal reaches the demo only, which then
            # stops everything in order instead of racing its children.
            process = await anyio.open_process(
                command, stderr=stderr, start_new_session=True, **options
            )
        self._processes.append(process)
        return process

    def note_workers(self, daemon: Process) -> dict[int, int]:
        """Remembers the daemon's current children (its libtorrent worker) and returns them."""
        workers = _children_of(daemon.pid)
        self._workers.update(workers)
        return workers

    async def wait_workers_gone(self, workers: dict[int, int], timeout: float) -> list[int]:
        """Waits up to `timeout` for `workers` to exit; returns those still running."""
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid, started in workers.items() if _still_running(pid, started)]
            if not left or time.monotonic() >= deadline:
                return left
            # Not our children: there is nothing to wait on but /proc.
            await anyio.sleep(0.02)

    async def aclose(self) -> None:
        """Stops what still runs, the last started first: SIGTERM, then SIGKILL after
        STOP_TIMEOUT. A daemon stops its own worker on SIGTERM; a killed one's worker sees its
        stdin close and exits by itself, and is killed if it lingers."""
        with anyio.CancelScope(shield=True):
            for process in reversed(self._processes):
                if process.returncode is None:
                    self.note_workers(process)
                    with suppress(ProcessLookupError):
                        process.terminate()
                    with anyio.move_on_after(STOP_TIMEOUT):
                        await process.wait()
                if process.returncode is None:
                    self.note_workers(process)
                    with suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
                await process.aclose()
            for pid in await self.wait_workers_gone(self._workers, timeout=10.0):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# --- the demo folder -----------------------------------------------------------------------------


@dataclass
class Folder:
    """The demo's temporary folder, and a short one for the sockets if its path is too long."""

    root: Path
    sockets: Path
    extra: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls) -> Folder:
        root = Path(tempfile.mkdtemp(prefix="dlkeeper-demo-"))
        if len(str(root / "notify.sock")) <= MAX_SOCKET_PATH:
            return cls(root, root)
        sockets = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))
        return cls(root, sockets, [sockets])

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def api_socket(self) -> Path:
        return self.sockets / "api.sock"

    @property
    def notify_socket(self) -> Path:
        return self.sockets / "notify.sock"

    def remove(self) -> None:
        for path in [self.root, *self.extra]:
            shutil.rmtree(path, ignore_errors=True)


def _toml(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string or number is a TOML one too


def write_config(folder: Folder) -> Path:
    keys: dict[str, str | int | float | bool] = {
        "library_path": str(folder.library),
        "socket": str(folder.api_socket),
        "resume_save_interval": RESUME_SAVE_INTERVAL,
        "shutdown_timeout": 5,
        # The demo's payload is a few MiB: it runs on a nearly full disk too.
        "min_free_bytes": 0,
    }
    # The operator makes these (dlkeeper never makes library_path or download_path).
    (folder.library / "downloads").mkdir(parents=True, exist_ok=True)
    lines = [f"{key} = {_toml(value)}" for key, value in keys.items()]
    lines += ["", "[libtorrent]"]
    lines += [f"{key} = {_toml(value)}" for key, value in LOOPBACK_SETTINGS.items()]
    path = folder.root / "dlkeeper.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def resume_share(path: Path, piece_count: int) -> float:
    """The share of complete pieces in a .fastresume file, as libtorrent reads it; 0 when the
    file is missing or unreadable. (Partly downloaded pieces count as missing.)"""
    try:
        resume = bdecode(path.read_bytes())
    except (OSError, DlkeeperError):
        return 0.0
    if not isinstance(resume, dict) or not isinstance(resume.get(b"pieces"), bytes):
        return 0.0
    pieces: bytes = resume[b"pieces"]
    version = resume.get(b"file-version", 1)
    if isinstance(version, int) and version >= 2:
        have = sum(byte.bit_count() for byte in pieces)  # libtorrent 2.1: a bit per piece
    else:
        have = sum(byte & 1 for byte in pieces)  # before: a byte per piece, bit 0 = have
    return min(have / piece_count, 1.0) if piece_count else 0.0


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# rich takes 50 ms to import, which the daemon and dlkeeper's other commands need not pay.


def _consoles() -> tuple[Console, Console]:
    """The demo's output, and a console on stderr for the one-line reason of a failure."""
    from rich.console import Console  # noqa: PLC0415 - see above

    # soft_wrap: a line is never cut at 80 columns when the output is not a terminal.
    return Console(highlight=False, soft_wrap=True), Console(
        stderr=True, highlight=False, soft_wrap=True
    )


def _progress_bar(console: Console) -> Progress:
    from rich.progress import (  # noqa: PLC0415 - see above
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}"),
        console=console,
    )


def _stop(progress: Progress) -> None:
    # Each stop() of a progress bar that is not on a terminal prints an empty line.
    if progress.live.is_started:
        progress.stop()


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """Turns a step that overruns into a DemoFailed that says which step."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise DemoFailed(f"{what} took longer than {seconds:g} s")


# --- the scenario --------------------------------------------------------------------------------


class Demo:
    """The steps of the demo, in order; each either prints a ✓ line or raises DemoFailed."""

    def __init__(self, folder: Folder, console: Console, children: Children) -> None:
        self.folder = folder
        self.console = console
        self.children = children
        self.findings = Findings()
        self.config = write_config(folder)
        self.daemon_number = 0
        self.daemon_log = folder.root / "daemon-1.log"
        self.daemon_started = 0.0

    def step(self, text: str) -> None:
        self.console.print(f"[green]✓[/] {text}", highlight=False)

    async def run(self) -> Findings:
        async with await anyio.create_unix_datagram_socket(
            local_path=self.folder.notify_socket
        ) as notify:
            seeder_started = time.monotonic()
            seeder = await self.children.start(
                [
                    sys.executable,
                    *("-m", "supervisor.demo_swarm", str(self.folder.root)),
                    *("--rate", str(SEEDER_RATE)),
                ],
                self.folder.root / "seeder.log",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            # The daemon starts while the seeder writes and hashes the payload.
            daemon = await self.start_daemon()
            payload = await self.wait_seeder(seeder)
            self.findings.payload_ready = time.monotonic() - seeder_started
            self.step(
                f"payload: {len(payload.files)} files, {payload.total_bytes / MiB:.0f} MiB, "
                f"seeded on 127.0.0.1:{payload.port} at {SEEDER_RATE / MiB:g} MiB/s "
                f"({self.findings.payload_ready:.1f} s)"
            )
            self.findings.first_ready = await self.wait_ready(daemon, notify)
            ready = self.findings.first_ready
            self.step(f"daemon ready in {ready:.2f} s (READY=1, pid {daemon.pid})")
            progress = _progress_bar(self.console)
            bar = progress.add_task(payload.name, total=payload.total_bytes, rate="")
            progress.start()
            try:
                await self.download_until_kill(daemon, payload, progress, bar)
                progress.update(bar, rate="SIGKILL")
                await self.kill(daemon, payload)
                daemon = await self.start_daemon()
                self.findings.second_ready = await self.wait_ready(daemon, notify)
                await self.finish_after_restart(daemon, payload, progress, bar)
            finally:
                _stop(progress)
            await self.stop(daemon)
            await self.stop_seeder(seeder)
        return self.findings

    # --- the seeder and the daemon --------------------------------------------------------------

    async def wait_seeder(self, seeder: Process) -> Payload:
        assert seeder.stdout is not None
        lines = BufferedByteReceiveStream(seeder.stdout)
        with _deadline(STEP_TIMEOUT, "writing and seeding the payload"):
            try:
                line = await lines.receive_until(b"\n", 1 << 20)
            except (anyio.IncompleteRead, anyio.DelimiterNotFound):
                await seeder.wait()
                reason = _tail(self.folder.root / "seeder.log") or f"exit {seeder.returncode}"
                raise DemoFailed(f"the seeder failed: {reason}") from None
        ready = json.loads(line)
        return Payload(
            port=int(ready["port"]),
            torrent=await anyio.Path(ready["torrent"]).read_bytes(),
            name=str(ready["name"]),
            total_bytes=int(ready["total_bytes"]),
            piece_count=int(ready["pieces"]),
            files={str(path): str(digest) for path, digest in ready["files"].items()},
        )

    async def stop_seeder(self, seeder: Process) -> None:
        assert seeder.stdin is not None
        await seeder.stdin.aclose()  # its signal to stop
        with _deadline(10, "stopping the seeder"):
            await seeder.wait()

    async def start_daemon(self) -> Process:
        self.daemon_number += 1
        self.daemon_log = self.folder.root / f"daemon-{self.daemon_number}.log"
        self.daemon_started = time.monotonic()
        return await self.children.start(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(self.config)],
            self.daemon_log,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(self.folder.notify_socket)},
        )

    async def wait_ready(self, daemon: Process, notify: UNIXDatagramSocket) -> float:
        """Waits for READY=1 on the notify socket, as systemd does; the seconds it took."""
        ready_after: float | None = None
        with _deadline(STEP_TIMEOUT, "starting the daemon"):
            async with anyio.create_task_group() as tasks:

                async def stop_waiting_when_it_exits() -> None:
                    await daemon.wait()
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stop_waiting_when_it_exits)
                while ready_after is None:
                    message, _ = await notify.receive()
                    if b"READY=1" in message.split(b"\n"):
                        ready_after = time.monotonic() - self.daemon_started
                tasks.cancel_scope.cancel()
        if ready_after is None:
            reason = _tail(self.daemon_log) or "no log"
            raise DemoFailed(f"the daemon exited with status {daemon.returncode}: {reason}")
        return ready_after

    def daemon_problem(self, daemon: Process, exc: Exception) -> DemoFailed:
        if daemon.returncode is not None:
            reason = _tail(self.daemon_log) or "no log"
            return DemoFailed(f"the daemon exited with status {daemon.returncode}: {reason}")
        return DemoFailed(f"the daemon failed a request: {exc}")

    @asynccontextmanager
    async def client(self, daemon: Process) -> AsyncIterator[DlkeeperClient]:
        try:
            async with DlkeeperClient(
                self.folder.api_socket, request_timeout=10, connect_timeout=5
            ) as client:
                yield client
        except BaseException as exc:
            # What the block raised may come inside the exception groups of its own tasks.
            error = next(leaves(exc), exc)  # the first, when groups wrap it
            if isinstance(error, DlkeeperError):
                raise self.daemon_problem(daemon, error) from error
            if error is exc:
                raise
            raise error from None

    # --- the steps ------------------------------------------------------------------------------

    async def download_until_kill(
        self, daemon: Process, payload: Payload, progress: Progress, bar: TaskID
    ) -> None:
        resume_file = self.folder.library / "downloads" / "torrents" / f"{TASK_ID}.fastresume"
        async with self.client(daemon) as client:
            await client.subscribe(progress_interval=PROGRESS_INTERVAL)
            await client.add(
                torrent_b64=base64.b64encode(payload.torrent).decode("ascii"),
                task_id=TASK_ID,
                peers=[f"127.0.0.1:{payload.port}"],
            )
            self.step(f"added task {TASK_ID!r} with the seeder as its peer")
            with _deadline(STEP_TIMEOUT, f"downloading to {KILL_AT:.0%}"):
                async for event in client.events():
                    if isinstance(event, DownloadFailedEvent) and event.task_id == TASK_ID:
                        raise DemoFailed(f"the download failed: {event.error}")
                    if not isinstance(event, DownloadProgressEvent) or event.task_id != TASK_ID:
                        continue
                    progress.update(
                        bar,
                        completed=event.progress * payload.total_bytes,
                        rate=f"{event.download_rate / MiB:.1f} MiB/s",
                    )
                    # Only once a periodic save has happened: that is what the kill tests.
                    if event.progress >= KILL_AT and resume_file.exists():
                        break
            # As close to the kill as it gets.
            self.findings.at_kill = (await client.get(TASK_ID)).progress

    async def kill(self, daemon: Process, payload: Payload) -> None:
        workers = self.children.note_workers(daemon)
        daemon.send_signal(signal.SIGKILL)
        killed_at = time.time()
        with _deadline(10, "reaping the killed daemon"):
            await daemon.wait()
        low, high = KILL_WINDOW
        if not low <= self.findings.at_kill <= high:
            raise DemoFailed(
                f"the kill landed at {self.findings.at_kill:.1%}, outside {low:.0%}-{high:.0%}: "
                "the download went faster or slower than the seeder's limit allows"
            )
        resume_file = self.folder.library / "downloads" / "torrents" / f"{TASK_ID}.fastresume"
        try:
            self.findings.resume_age = max(killed_at - resume_file.stat().st_mtime, 0.0)
        except OSError as exc:
            raise DemoFailed(f"no resume data after the kill: {exc}") from exc
        with suppress(OSError):  # a copy to look at with --keep: the ack deletes the original
            shutil.copyfile(resume_file, self.folder.root / "at-kill.fastresume")
        self.findings.resume_saved = resume_share(resume_file, payload.piece_count)
        self.findings.state_file_progress = self.saved_record_progress()
        self.step(
            f"SIGKILL at {self.findings.at_kill:.1%}; the resume data, saved "
            f"{self.findings.resume_age:.1f} s before, holds {self.findings.resume_saved:.1%}"
        )
        if self.findings.resume_age > MAX_RESUME_AGE:
            raise DemoFailed(
                f"the resume data was {self.findings.resume_age:.1f} s old at the kill; "
                f"saved every {RESUME_SAVE_INTERVAL:g} s it should be at most {MAX_RESUME_AGE:g} s"
            )
        left = await self.children.wait_workers_gone(workers, timeout=10.0)
        if left:
            raise DemoFailed(f"the libtorrent worker (pid {left[0]}) outlived its killed daemon")
        self.step("the killed daemon's libtorrent worker exited by itself")

    def saved_record_progress(self) -> float:
        """The download's progress in downloads.json, which the kill must have left whole."""
        state_file = self.folder.library / "data" / "downloads.json"
        try:
            record = json.loads(state_file.read_bytes())["downloads"][TASK_ID]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DemoFailed(f"after the kill {state_file} has no readable {TASK_ID!r}") from exc
        if record.get("status") != "downloading":
            raise DemoFailed(f"after the kill the state file says {record.get('status')!r}")
        return float(record.get("progress", 0.0))

    async def finish_after_restart(
        self, daemon: Process, payload: Payload, progress: Progress, bar: TaskID
    ) -> None:
        restarted = time.monotonic()
        async with self.client(daemon) as client:
            loaded = await self.check_resumed(client)
            progress.update(bar, completed=loaded.progress * payload.total_bytes)
            self.step(
                f"restarted, ready in {self.findings.second_ready:.2f} s; "
                f"{' → '.join(self.findings.statuses_after_restart)} at "
                f"{self.findings.after_restart:.1%}, no re-check"
            )
            await client.subscribe(progress_interval=PROGRESS_INTERVAL)
            remaining = (1 - loaded.progress) * payload.total_bytes / SEEDER_RATE
            with _deadline(STEP_TIMEOUT + remaining, "finishing the download"):
                async for event in client.events():
                    if event.task_id != TASK_ID:
                        continue
                    if isinstance(event, DownloadFailedEvent):
                        raise DemoFailed(f"the download failed: {event.error}")
                    if isinstance(event, DownloadProgressEvent):
                        progress.update(
                            bar,
                            completed=event.progress * payload.total_bytes,
                            rate=f"{event.download_rate / MiB:.1f} MiB/s",
                        )
                    elif isinstance(event, DownloadCompletedEvent):
                        progress.update(bar, completed=payload.total_bytes, rate="done")
                        completed = event
                        break
                else:
                    raise DemoFailed("the daemon's events ended before download.completed")
            self.findings.finished_after_restart = time.monotonic() - restarted
            _stop(progress)
            self.step(
                f"download.completed {self.findings.finished_after_restart:.1f} s after the restart"
            )
            await self.verify_files(completed, payload)
            await client.ack(TASK_ID)
            left = await client.list()
            if left:
                raise DemoFailed(f"after the ack the daemon still lists {left[0].task_id!r}")
            missing = [
                path for path in payload.files if not (Path(completed.save_path) / path).is_file()
            ]
            if missing:
                raise DemoFailed(f"after the ack {missing[0]!r} is gone; the files must stay")
            self.step("acked: gone from the daemon's list, its files stay")

    async def check_resumed(self, client: DlkeeperClient) -> DownloadInfo:
        """Watches the download from READY until libtorrent has taken it up: it must come back
        from its resume data, at no less than that held, and never be checked from 0."""
        saved = self.findings.resume_saved
        slack = 0.005  # a share of whole pieces vs libtorrent's count of bytes
        observed: list[DownloadInfo] = []
        with _deadline(STEP_TIMEOUT, "resuming the download after the restart"):
            while True:
                info = await client.get(TASK_ID)
                observed.append(info)
                if info.status not in ("queued", "checking"):
                    break
                # Polled: no event tells a status change, and a check is over in moments.
                await anyio.sleep(0.02)
        loaded = observed[-1]
        self.findings.after_restart = loaded.progress
        for info in observed:
            if info.status not in self.findings.statuses_after_restart:
                self.findings.statuses_after_restart.append(info.status)
        # While libtorrent reads resume data the daemon shows at least the saved progress; a
        # check of the files shows libtorrent's own, which starts from 0.
        floor = min(saved, self.findings.state_file_progress) - slack
        for info in observed:
            if info.status == "checking" and info.progress < floor:
                raise DemoFailed(
                    f"after the restart the download was checking at {info.progress:.1%}, below "
                    f"the {saved:.1%} of its resume data: its files were re-checked"
                )
        if loaded.progress < saved - slack:
            raise DemoFailed(
                f"after the restart the download went on from {loaded.progress:.1%}, below the "
                f"{saved:.1%} its resume data held"
            )
        stats = await client.stats()
        if stats.resumed_at_start != 1 or stats.resume_failures:
            raise DemoFailed(
                f"the daemon resumed {stats.resumed_at_start} downloads at start, with "
                f"{stats.resume_failures} failures; expected 1 and 0"
            )
        log = self.daemon_log.read_text(errors="replace")
        for problem in RESUME_PROBLEMS:
            if problem in log:
                raise DemoFailed(f"the restarted daemon logged {problem!r}: it re-checked files")
        return observed[-1]

    async def verify_files(self, completed: DownloadCompletedEvent, payload: Payload) -> None:
        listed = {file.path for file in completed.files}
        if listed != set(payload.files):
            raise DemoFailed(
                f"download.completed lists {sorted(listed)}, not the payload's "
                f"{sorted(payload.files)}"
            )
        for path, expected in payload.files.items():
            actual = await anyio.to_thread.run_sync(sha256_of, Path(completed.save_path) / path)
            if actual != expected:
                raise DemoFailed(f"{path}: SHA-256 {actual[:16]}…, the payload's {expected[:16]}…")
        self.findings.files_verified = len(payload.files)
        self.step(f"all {len(payload.files)} files have the payload's SHA-256")

    async def stop(self, daemon: Process) -> None:
        workers = self.children.note_workers(daemon)
        daemon.send_signal(signal.SIGTERM)
        with _deadline(STOP_TIMEOUT, "stopping the daemon with SIGTERM"):
            status = await daemon.wait()
        if status != 0:
            raise DemoFailed(f"the daemon exited with status {status} on SIGTERM, not 0")
        if await self.children.wait_workers_gone(workers, timeout=10.0):
            raise DemoFailed("the libtorrent worker outlived its stopped daemon")
        self.step("daemon stopped cleanly on SIGTERM (exit 0)")


# --- running it ----------------------------------------------------------------------------------


async def _run(folder: Folder, console: Console) -> Findings:
    """Runs the demo; a SIGINT, SIGTERM or SIGHUP cancels it and raises Interrupted. Every
    child is gone when this returns or raises."""
    children = Children()
    outcome: list[Findings | Exception] = []
    interrupted = False

    async def demo(scope: anyio.CancelScope) -> None:
        try:
            outcome.append(await Demo(folder, console, children).run())
        except Exception as exc:  # re-raised below, outside the task group and its wrapping
            outcome.append(exc)
        finally:
            scope.cancel()

    async def watch_signals(scope: anyio.CancelScope) -> None:
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for _ in signals:
                interrupted = True
                scope.cancel()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch_signals, tasks.cancel_scope)
            tasks.start_soon(demo, tasks.cancel_scope)
    finally:
        await children.aclose()
    if interrupted or not outcome:
        raise Interrupted
    result = outcome[0]
    if isinstance(result, Exception):
        raise result
    return result


def _summary(console: Console, findings: Findings, total: float) -> None:
    lost = max(findings.at_kill - findings.after_restart, 0.0)
    rows = [
        (
            "daemon start to READY=1",
            f"{findings.first_ready:.2f} s; after the kill {findings.second_ready:.2f} s",
        ),
        ("progress at the SIGKILL", f"{findings.at_kill:.1%}"),
        (
            "resume data on disk",
            f"{findings.resume_saved:.1%} of pieces, saved {findings.resume_age:.1f} s before",
        ),
        (
            "progress after restart",
            f"{findings.after_restart:.1%} ({' → '.join(findings.statuses_after_restart)}; "
            f"lost {lost:.1%})",
        ),
        ("re-check after restart", "none"),
        ("finished after restart", f"{findings.finished_after_restart:.1f} s"),
        ("files with the right SHA-256", f"{findings.files_verified} of {findings.files_verified}"),
        ("completion acked", "yes; files kept"),
        ("total", f"{total:.1f} s"),
    ]
    console.print("\nWhat this proved:", style="bold")
    for label, value in rows:
        console.print(f"  {label:<29} {value}")


def run_demo(*, keep: bool) -> int:
    """Runs the demo in a temporary folder (kept, and its path printed, when `keep`).

    Returns 0 when every check held, 1 with a one-line reason on stderr otherwise, 130 when
    interrupted. Every process it started is gone when it returns.
    """
    console, errors = _consoles()
    started = time.monotonic()
    try:
        folder = Folder.create()
    except OSError as exc:
        errors.print(f"[red]✗[/] cannot create the demo folder: {exc}")
        return exits.FAILURE
    console.print("[bold]dlkeeper demo[/]: a download that survives a SIGKILL of its daemon")
    console.print(f"  in {folder.root}")
    try:
        findings = anyio.run(_run, folder, console)
    except DemoFailed as exc:
        hint = f" (logs in {folder.root})" if keep else " (run with --keep to read the logs)"
        errors.print(f"[red]✗[/] {exc}{hint}")
        return exits.FAILURE
    except (Interrupted, KeyboardInterrupt):
        errors.print("[red]✗[/] interrupted; every process the demo started is stopped")
        return exits.INTERRUPTED
    except OSError as exc:
        errors.print(f"[red]✗[/] {exc}")
        return exits.FAILURE
    finally:
        if keep:
            console.print(f"Kept the demo folder: {folder.root}")
        else:
            folder.remove()
    total = time.monotonic() - started
    _summary(console, findings, total)
    console.print(f"[green]✓ all checks passed[/] in {total:.1f} s")
    return exits.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.demo",
        description=(
            "Download a generated payload from a local seeder, SIGKILL the daemon part-way, "
            "restart it and show that it resumes without a re-check. Needs no network."
        ),
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs, library, payload)"
    )
    args = parser.parse_args(argv)
    return run_demo(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
