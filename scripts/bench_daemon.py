"""The whole daemon, end to end through its socket: start, durable adds, completion, memory.

    PYTHONPATH=. .venv/bin/python scripts/bench_daemon.py [--runs N] [--downloads N]
        [--adds N] [--connections N] [--in-flight N] [--completions N]
        [--size-kib KIB] [--calibration N] [--idle SECONDS] [--dir DIR]

Every measurement runs a real `python -m supervisor serve --config CFG` child process on a
loopback-only library (tests.daemons.write_config: DHT, LSD, UPnP, NAT-PMP and uTP off), ready
when it sends READY=1 to a NOTIFY_SOCKET this script binds, as systemd would. Prints only.

1. Start: spawn -> READY=1 (median of `--runs`), with an empty library and with `--downloads`
   persisted paused downloads. Those are made once: distinct magnets added with paused=true
   through the socket (no seeder needed), then the daemon is stopped with SIGTERM so that it
   saves their resume data. The runs alternate empty / full. The daemon's own log lines (ms
   timestamps) split each start into: state loaded, worker ready, replay done. Reference: the
   same interpreter running `pass`, `import libtorrent`, and the imports of the daemon and of
   its worker.
2. Durable add rate: magnets with distinct random info hashes and paused=true (no network),
   `--adds` of them per phase, over 1 connection one at a time (each waits for its `ok`), then
   over `--connections` connections one at a time each (for reference), then over
   `--connections` connections each keeping `--in-flight` adds in flight (the goal's phase);
   each phase on a fresh daemon and an empty library (after 20 uncounted warm-up adds). A
   count, not a duration: every state write rewrites the whole file, so a faster phase that ran
   as long would end with a bigger library and pay for it; with a count every phase ends with
   the same downloads.json, and the rates compare writes of the same sizes. Per
   phase also: the bytes the daemon sent to storage (/proc/<pid>/io, hence about how many adds
   each state write carried) and the CPU per add of the daemon's event loop, of its other
   threads, of the worker and of this client.
   Reference: the raw rates of write+fsync and of an atomic replace (write, fsync, rename,
   fsync of the folder) in the same folder.
3. Completion latency: `--completions` downloads of `--size-kib` each from a loopback seeder in
   this process, one at a time, added through the socket while a second connection is
   subscribed; from the seeder's timestamp of the downloader's last HAVE (libtorrent sends it
   in the step that finishes the torrent; see scripts/bench_latency.py) to the moment
   `download.completed` is read from the subscribed socket. A calibration with a bare
   libtorrent session in this process measures finished -> seeder sees the last HAVE.
4. Memory: VmRSS of the daemon and of its worker (its child), idle for `--idle` seconds with 10
   paused downloads (4 GiB single-file torrents of 4 MiB pieces, added as torrent_b64), and
   bare references (python, the daemon's imports, the worker's imports, a bare libtorrent
   session with the same torrents).

Goals (from the issue): READY=1 within 1 s with 1,000 persisted downloads (median); 10
connections reach at least 5x the add rate of 1; download.completed on the socket < 0.1 s after
libtorrent finished (every download); daemon + worker VmRSS <= 90 MiB idle with 10 downloads.

Everything happens in a fresh temporary folder (under `--dir` when given, to measure a real disk
such as an SD card) and a short one for the sockets, removed at the end, with every process.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import libtorrent as lt
import orjson
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from benchlib import (
    Distribution,
    add_dir_argument,
    check_dir,
    cores,
    cpu_model,
    cpu_of,
    filesystem_of,
    memory_of,
    mib,
    ms,
    percentile,
    print_platform,
    seen,
    verdict,
    worst,
)
from benchlib import time_command as _time_command
from benchseeder import Sample, latency_payloads, seeder_view, seeding_all, through_bare_session

from actors.metainfo import bencode
from tests.daemons import layout_of, write_config
from tests.swarm import LOOPBACK_SETTINGS, Seeder
from tests.torrents import Payload

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB

START_GOAL = 1.0  # seconds, spawn -> READY=1 with --downloads persisted (median)
RATE_GOAL = 5.0  # adds/s over --connections / adds/s over 1, at least
LATENCY_GOAL = 0.1  # seconds, finished -> download.completed on the socket (every one)
RSS_GOAL = 90 * KiB  # KiB, daemon + worker VmRSS idle with RSS_DOWNLOADS downloads
RSS_DOWNLOADS = 10

DEADLINE = 60.0  # for READY=1, one reply, one download, a clean stop
MAX_LINE = 8 * MiB
RAW_SECONDS = 1.0  # per raw fsync reference
WARMUP_ADDS = 20  # one at a time before each add phase, not counted
RSS_TORRENT_BYTES = 4 * 1024 * MiB
RSS_PIECE = 4 * MiB

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
_REPLAYED = re.compile(r"^replayed (\d+) of (\d+) downloads in ([\d.]+) s$")

# --- the daemon as a child process ---------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This environment, with the repository first on PYTHONPATH (the worker inherits it)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_worker(pid: int) -> bool:
    """Whether `pid` is (still) a dlkeeper libtorrent worker, not a reused pid."""
    try:
        return b"actors.session_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class DaemonProcess:
    """`python -m supervisor serve --config CONFIG`, stderr to `log`, READY=1 on a datagram
    socket bound here. `close()` always kills and reaps it, and any worker it left behind."""

    def __init__(self, config: Path, socket_path: Path, log: Path) -> None:
        self.socket_path = socket_path
        self.log = log
        self._notify_dir = Path(tempfile.mkdtemp(prefix="dkbench-n"))
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._log_file = log.open("ab")
        self.workers: set[int] = set()
        try:
            self._notify.bind(str(self._notify_dir / "notify"))
            env = {**child_env(), "NOTIFY_SOCKET": str(self._notify_dir / "notify")}
            command = [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
            self.spawned_wall = time.time()
            self.spawned = time.perf_counter()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stderr=self._log_file, env=env, cwd=ROOT
            )
        except BaseException:
            self._release()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> float:
        """Seconds from spawn to READY=1."""
        deadline = time.monotonic() + DEADLINE
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"no READY=1 (exit {self.process.poll()}); log:\n{tail}")
            self._notify.settimeout(min(remaining, 0.5))
            try:
                notice = self._notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in notice.split(b"\n"):
                return time.perf_counter() - self.spawned

    def find_workers(self) -> list[int]:
        found = [pid for pid in children_of(self.pid) if is_worker(pid)]
        self.workers.update(found)
        return found

    def stop(self) -> float:
        """SIGTERM, then wait: the seconds to exit. Raises unless it exits 0."""
        self.find_workers()
        began = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(DEADLINE)
        seconds = time.perf_counter() - began
        if status != 0:
            raise RuntimeError(f"the daemon exited {status} after SIGTERM; see {self.log}")
        return seconds

    def close(self) -> None:
        if self.process.poll() is None:
            self.find_workers()
            self.process.kill()
        self.process.wait(DEADLINE)
        for pid in self.workers:  # it exits when its stdin closes; never wait on that here
            deadline = time.monotonic() + 5
            while is_worker(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._release()

    def _release(self) -> None:
        self._notify.close()
        self._log_file.close()
        shutil.rmtree(self._notify_dir, ignore_errors=True)


@contextlib.contextmanager
def daemon(config: Path, socket_path: Path, log: Path) -> Iterator[DaemonProcess]:
    """A started daemon (not yet ready); killed at the end of the block whatever happened."""
    process = DaemonProcess(config, socket_path, log)
    try:
        yield process
    finally:
        process.close()


@dataclass(frozen=True)
class Workspace:
    """The temporary folders: `root` for libraries, `sockets` short (a socket path <= 107 B)."""

    root: Path
    sockets: Path

    def library(self, name: str) -> tuple[Path, Path]:
        """(config file, socket path) of a library called `name`, made on first use."""
        folder = self.root / name
        socket_path = self.sockets / f"{name}.sock"
        config = folder / "dlkeeper.toml"
        if not config.exists():
            write_config(folder, folder / "library", socket_path=socket_path)
        return config, socket_path

    def state_file(self, name: str) -> Path:
        return layout_of(self.library(name)[0]).state_file

    def torrents_dir(self, name: str) -> Path:
        return layout_of(self.library(name)[0]).torrents_dir


# --- a raw JSON-lines client ---------------------------------------------------------------------


class ApiConnection:
    """One connection to the socket: JSON lines out, replies and events in, nothing more."""

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._lines = BufferedByteReceiveStream(stream)
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, path: Path) -> ApiConnection:
        return cls(await anyio.connect_unix(str(path)))

    async def send(self, message: dict[str, Any]) -> None:
        await self._stream.send(orjson.dumps(message) + b"\n")

    async def receive(self) -> dict[str, Any]:
        message = orjson.loads(await self._lines.receive_until(b"\n", MAX_LINE))
        if not isinstance(message, dict):
            raise TypeError(f"the daemon sent {message!r}")
        return message

    async def call(self, op: str, **params: Any) -> Any:
        """The result of one request that must succeed (events read meanwhile are dropped)."""
        request_id = next(self._ids)
        await self.send({"id": request_id, "op": op, **params})
        with anyio.fail_after(DEADLINE):
            while True:
                reply = await self.receive()
                if reply.get("id") == request_id:
                    break
        if not reply.get("ok"):
            raise RuntimeError(f"{op} failed: {reply.get('error')}")
        return reply["result"]

    async def aclose(self) -> None:
        await self._stream.aclose()


def ping(path: Path) -> None:
    """One ping over a blocking socket; returns once it is answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(path))
        sock.sendall(b'{"id": 1, "op": "ping"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("the daemon closed the connection before answering ping")
            data += chunk
    if not json.loads(data).get("ok"):
        raise RuntimeError(f"ping failed: {data!r}")


def random_magnet() -> str:
    info_hash = secrets.token_hex(20)
    return f"magnet:?xt=urn:btih:{info_hash}&dn=bench-{info_hash[:8]}"


# --- 2. durable adds -----------------------------------------------------------------------------


@dataclass
class AddCounts:
    adds: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    budget: int | None = None  # adds still to send, when the phase is a count, not a duration

    def take(self) -> bool:
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


async def drive_adds(
    connection: ApiConnection, in_flight: int, deadline: float, counts: AddCounts
) -> None:
    """Sends paused magnet adds, `in_flight` at a time, until the deadline (or the budget is
    spent); returns once every reply is in."""
    window = anyio.Semaphore(in_flight)
    sent_at: dict[int, float] = {}
    ids = itertools.count(1)

    async def read_replies() -> None:
        while True:
            reply = await connection.receive()
            began = sent_at.pop(reply.get("id"), None)  # type: ignore[arg-type]
            if began is None:
                raise RuntimeError(f"a reply to no add of this connection: {reply}")
            counts.latencies.append(time.perf_counter() - began)
            if reply.get("ok"):
                counts.adds += 1
            else:
                counts.errors[str(reply.get("error", {}).get("code"))] += 1
            window.release()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(read_replies)
        while True:
            await window.acquire()
            if time.perf_counter() >= deadline or not counts.take():
                window.release()
                break
            request_id = next(ids)
            sent_at[request_id] = time.perf_counter()
            add = {"id": request_id, "op": "add", "magnet": random_magnet(), "paused": True}
            await connection.send(add)
        with anyio.fail_after(DEADLINE):
            for _ in range(in_flight):  # every reply back
                await window.acquire()
        task_group.cancel_scope.cancel()


async def run_adds(
    path: Path, connections: int, in_flight: int, duration: float, count: int | None = None
) -> tuple[AddCounts, float]:
    """Adds for `duration` seconds (or `count` adds) over `connections` connections: the
    counts and the seconds from the first send to the last reply."""
    opened = [await ApiConnection.open(path) for _ in range(connections)]
    counts = AddCounts(budget=count)
    try:
        began = time.perf_counter()
        deadline = math.inf if count is not None else began + duration
        async with anyio.create_task_group() as task_group:
            for connection in opened:
                task_group.start_soon(drive_adds, connection, in_flight, deadline, counts)
        elapsed = time.perf_counter() - began
    finally:
        for connection in opened:
            await connection.aclose()
    return counts, elapsed


@dataclass(frozen=True)
class AddPhase:
    connections: int
    in_flight: int
    counts: AddCounts
    elapsed: float
    state_bytes: int
    daemon_cpu: float  # CPU seconds used during the phase
    loop_cpu: float  # of which by the daemon's main thread (its event loop)
    worker_cpu: float
    client_cpu: float  # this process
    written: int  # bytes the daemon sent to storage during the phase (/proc/<pid>/io)

    @property
    def rate(self) -> float:
        return self.counts.adds / self.elapsed

    def per_add(self, cpu: float) -> float:
        return cpu / max(1, self.counts.adds)


def add_phase(
    space: Workspace, name: str, connections: int, in_flight: int, count: int
) -> AddPhase:
    """One phase on a fresh daemon and a library holding only WARMUP_ADDS downloads."""
    config, socket_path = space.library(name)
    with daemon(config, socket_path, space.root / f"{name}.log") as process:
        process.wait_ready()
        anyio.run(run_adds, socket_path, 1, 1, 0.0, WARMUP_ADDS, backend="asyncio")
        workers = process.find_workers()
        before = (cpu_of(process.pid), sum(map(cpu_of, workers)), time.process_time())
        loop_before = cpu_of(process.pid, process.pid)
        written = written_by(process.pid)
        counts, elapsed = anyio.run(
            run_adds, socket_path, connections, in_flight, 0.0, count, backend="asyncio"
        )
        after = (cpu_of(process.pid), sum(map(cpu_of, workers)), time.process_time())
        loop_cpu = cpu_of(process.pid, process.pid) - loop_before
        written = written_by(process.pid) - written
        process.stop()
    daemon_cpu, worker_cpu, client_cpu = (b - a for a, b in zip(before, after, strict=True))
    state_bytes = space.state_file(name).stat().st_size
    return AddPhase(
        connections,
        in_flight,
        counts,
        elapsed,
        state_bytes,
        daemon_cpu,
        loop_cpu,
        worker_cpu,
        client_cpu,
        written,
    )


def written_by(pid: int) -> int:
    """Bytes a process (all its threads) has sent to storage: write_bytes of /proc/<pid>/io."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "write_bytes":
                return int(value)
    return 0


@dataclass(frozen=True)
class RawRates:
    fsync: float  # write 4 KiB + fsync of one file, per second
    replace: float  # write state_bytes to a new file + fsync + rename + fsync folder, per second
    replace_bytes: int


def raw_rates(directory: Path, replace_bytes: int) -> RawRates:
    """The disk's own durable write rates in `directory`, RAW_SECONDS each."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * KiB)
    target = directory / "raw.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fsyncs, began = 0, time.perf_counter()
        while time.perf_counter() - began < RAW_SECONDS:
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            fsyncs += 1
        fsync_rate = fsyncs / (time.perf_counter() - began)
    finally:
        os.close(fd)
    data = os.urandom(replace_bytes)
    temporary = directory / "raw.tmp"
    replaces, began = 0, time.perf_counter()
    while time.perf_counter() - began < RAW_SECONDS:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(target)
        folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        replaces += 1
    replace_rate = replaces / (time.perf_counter() - began)
    shutil.rmtree(directory, ignore_errors=True)
    return RawRates(fsync_rate, replace_rate, replace_bytes)


# --- 1. start ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRun:
    ready: float  # spawn -> READY=1
    pinged: float  # spawn -> the first ping answered (after READY=1)
    loaded: float  # spawn -> the "state: ..." log line (imports, lock, downloads.json)
    worker: float  # spawn -> "libtorrent ... worker (pid N) listening"
    replayed: float  # spawn -> "replayed N of M downloads"
    replay: float  # the replay's own duration, from that line
    resumed: int
    stop: float  # SIGTERM -> exit 0
    daemon_rss: int  # KiB, just after the ping
    worker_rss: int


def log_times(log: Path, since: float) -> dict[str, float]:
    """Seconds after `since` (wall clock) of the daemon's milestones in `log`, and the replay's
    own duration and count."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - since
        message = match[2]
        if message.startswith("state: ") and "loaded" not in found:
            found["loaded"] = stamp
        elif message.startswith("libtorrent ") and " worker (pid " in message:
            found.setdefault("worker", stamp)
        elif (replayed := _REPLAYED.match(message)) is not None:
            found.setdefault("replayed", stamp)
            found.setdefault("replay", float(replayed[3]))
            found.setdefault("resumed", float(replayed[1]))
    return found


def start_once(space: Workspace, name: str, run: int) -> StartRun:
    config, socket_path = space.library(name)
    log = space.root / f"{name}-start-{run}.log"
    with daemon(config, socket_path, log) as process:
        ready = process.wait_ready()
        ping(socket_path)
        pinged = time.perf_counter() - process.spawned
        workers = process.find_workers()
        daemon_rss = memory_of(process.pid).get("VmRSS", 0)
        worker_rss = sum(memory_of(pid).get("VmRSS", 0) for pid in workers)
        stop = process.stop()
    times = log_times(log, process.spawned_wall)
    return StartRun(
        ready=ready,
        pinged=pinged,
        loaded=times.get("loaded", math.nan),
        worker=times.get("worker", math.nan),
        replayed=times.get("replayed", math.nan),
        replay=times.get("replay", math.nan),
        resumed=int(times.get("resumed", -1)),
        stop=stop,
        daemon_rss=daemon_rss,
        worker_rss=worker_rss,
    )


@dataclass(frozen=True)
class StartSetup:
    seconds: float  # the adds
    stop: float  # the clean stop that saved resume data
    counts: AddCounts
    resume_files: int
    state_bytes: int


def set_up_library(space: Workspace, name: str, count: int) -> StartSetup:
    """`count` paused magnets added through the socket (10 connections, 10 in flight each),
    then a clean stop."""
    config, socket_path = space.library(name)
    with daemon(config, socket_path, space.root / f"{name}-setup.log") as process:
        process.wait_ready()
        counts, seconds = anyio.run(run_adds, socket_path, 10, 10, 0.0, count, backend="asyncio")
        stop = process.stop()
    if counts.adds != count:
        raise RuntimeError(f"setup added {counts.adds} of {count}: {dict(counts.errors)}")
    resume_files = len(list(space.torrents_dir(name).glob("*.fastresume")))
    return StartSetup(seconds, stop, counts, resume_files, space.state_file(name).stat().st_size)


def time_command(command: list[str]) -> float:
    return _time_command(command, env=child_env(), cwd=ROOT)


REFERENCE_STARTS: tuple[tuple[str, str], ...] = (
    ("python -c pass", "pass"),
    ('python -c "import libtorrent"', "import libtorrent"),
    ("the daemon's imports (import supervisor.cli)", "import supervisor.cli"),
    ("the worker's imports (import actors.session_worker)", "import actors.session_worker"),
)


def reference_starts(runs: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {label: [] for label, _ in REFERENCE_STARTS}
    for _ in range(runs):
        for label, code in REFERENCE_STARTS:
            found[label].append(time_command([sys.executable, "-c", code]))
    return found


# --- 3. completion latency -----------------------------------------------------------------------


async def completions_through_daemon(
    socket_path: Path, payloads: list[Payload], seeder: Seeder
) -> list[Sample]:
    """Each payload added (not paused, the seeder as its peer) on one connection; its
    download.completed awaited on another, subscribed, connection."""
    requests = await ApiConnection.open(socket_path)
    events = await ApiConnection.open(socket_path)
    samples: list[Sample] = []
    try:
        await events.call("subscribe")
        for number, payload in enumerate(payloads):
            task_id = f"latency-{number}"
            seeder.session.pop_alerts()
            await requests.call(
                "add",
                task_id=task_id,
                torrent_b64=base64.b64encode(payload.torrent).decode("ascii"),
                peers=[seeder.peer],
            )
            with anyio.fail_after(DEADLINE):
                while True:
                    event = await events.receive()
                    received = time.time()
                    if event.get("task_id") != task_id:
                        continue
                    if event.get("event") == "download.completed":
                        break
                    if event.get("event") == "download.failed":
                        raise RuntimeError(f"download {task_id} failed: {event.get('error')}")
            samples.append(Sample(received, await seeder_view(seeder, payload.info_hash)))
            await requests.call("ack", task_id=task_id)
    finally:
        await requests.aclose()
        await events.aclose()
    return samples


@dataclass(frozen=True)
class Completions:
    payloads: list[Payload]
    size: int
    daemon: list[Sample]
    bare: list[Sample]


def measure_completions(
    space: Workspace, downloads: int, size_kib: int, calibration: int
) -> Completions:
    size = size_kib * KiB
    payloads = latency_payloads(space.root / "seed", downloads, size)
    config, socket_path = space.library("latency")
    with seeding_all(payloads) as seeder:
        # The calibration: the same downloads by a bare libtorrent session in this process.
        bare = through_bare_session(space.root / "bare", payloads[:calibration], seeder, DEADLINE)
        with daemon(config, socket_path, space.root / "latency.log") as process:
            process.wait_ready()
            samples = anyio.run(
                completions_through_daemon, socket_path, payloads, seeder, backend="asyncio"
            )
            process.stop()
    return Completions(payloads, size, samples, bare)


# --- 4. memory -----------------------------------------------------------------------------------


def fake_torrent(number: int) -> bytes:
    """A single-file .torrent of RSS_TORRENT_BYTES in RSS_PIECE pieces (no payload: paused)."""
    pieces = RSS_TORRENT_BYTES // RSS_PIECE
    hashes = b"".join(hashlib.sha1(f"{number}/{p}".encode()).digest() for p in range(pieces))
    name = f"Memory.{number:02d}.2160p.WEB-DL.x265-GRP.mkv"
    info = {"name": name, "length": RSS_TORRENT_BYTES, "piece length": RSS_PIECE, "pieces": hashes}
    return bencode({"info": info, "created by": "dlkeeper bench_daemon"})


async def add_torrents(path: Path, torrents: list[bytes]) -> None:
    connection = await ApiConnection.open(path)
    try:
        for data in torrents:
            encoded = base64.b64encode(data).decode("ascii")
            await connection.call("add", torrent_b64=encoded, paused=True)
    finally:
        await connection.aclose()


@dataclass(frozen=True)
class Memory:
    daemon: dict[str, int]
    workers: list[dict[str, int]]
    references: dict[str, dict[str, int]]
    idle: float


def measure_memory(space: Workspace, idle: float) -> Memory:
    torrents = [fake_torrent(number) for number in range(RSS_DOWNLOADS)]
    config, socket_path = space.library("memory")
    with daemon(config, socket_path, space.root / "memory.log") as process:
        process.wait_ready()
        anyio.run(add_torrents, socket_path, torrents, backend="asyncio")
        time.sleep(idle)
        daemon_memory = memory_of(process.pid)
        workers = [memory_of(pid) for pid in process.find_workers()]
        process.stop()
    folder = space.root / "memory-torrents"
    folder.mkdir()
    for number, data in enumerate(torrents):
        (folder / f"{number}.torrent").write_bytes(data)
    return Memory(daemon_memory, workers, reference_memory(folder), idle)


def rss_child(mode: str, torrents_dir: str, settings_json: str) -> None:
    """A reference process, self-contained: does `mode`, prints its VmRSS and RssAnon (KiB)."""
    import json  # noqa: PLC0415 - the child runs this function's source alone
    import time  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    if mode == "daemon imports":
        import supervisor.cli  # noqa: F401, PLC0415
    elif mode == "worker imports":
        import actors.session_worker  # noqa: F401, PLC0415
    elif mode == "libtorrent":
        import libtorrent as lt  # noqa: PLC0415

        session = lt.session(json.loads(settings_json))
        for path in sorted(Path(torrents_dir).glob("*.torrent")):
            params = lt.add_torrent_params()
            params.ti = lt.torrent_info(path.read_bytes())
            params.save_path = torrents_dir
            params.flags = (params.flags | lt.torrent_flags.paused) & ~(
                lt.torrent_flags.auto_managed
            )
            session.async_add_torrent(params)
        time.sleep(1.0)
        session.pop_alerts()
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0])
    print(json.dumps(found), flush=True)


REFERENCE_MEMORY: tuple[tuple[str, str], ...] = (
    ("python -c pass", "bare"),
    ("the daemon's imports (supervisor.cli)", "daemon imports"),
    ("the worker's imports (actors.session_worker)", "worker imports"),
    (f"bare libtorrent session + the same {RSS_DOWNLOADS} torrents", "libtorrent"),
)


def reference_memory(torrents_dir: Path) -> dict[str, dict[str, int]]:
    settings = json.dumps(LOOPBACK_SETTINGS)
    source = inspect.getsource(rss_child)
    found: dict[str, dict[str, int]] = {}
    for label, mode in REFERENCE_MEMORY:
        code = f"{source}\nrss_child({mode!r}, {str(torrents_dir)!r}, {settings!r})\n"
        completed = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            check=True,
            env=child_env(),
            cwd=ROOT,
        )
        found[label] = json.loads(completed.stdout)
    return found


# --- machine facts -------------------------------------------------------------------------------


def memory_total() -> str:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / MiB:.1f} GiB"
    return "unknown"


# --- output --------------------------------------------------------------------------------------


TABLE = Distribution(56)


def median(values: list[float]) -> float:
    valid = seen(values)
    return statistics.median(valid) if valid else math.nan


def print_header(space: Workspace, args: argparse.Namespace, load: tuple[float, ...]) -> None:
    print("dlkeeper daemon benchmark (a real `dlkeeper serve` child, through its socket)")
    print_platform(lt.__version__)
    print(f"  cpu          {cpu_model()}")
    print(f"  cores        {cores()}")
    print(f"  memory       {memory_total()}")
    print(f"  load average {' '.join(f'{one:.2f}' for one in load)} (at the start)")
    print(f"  directory    {space.root}")
    print(f"  filesystem   {filesystem_of(space.root)}")
    print(
        f"  runs         {args.runs} starts each; {args.adds:,} adds per phase; "
        f"{args.completions} completions of {args.size_kib} KiB; idle {args.idle:g} s"
    )
    print()


def print_starts(
    setup: StartSetup,
    empty: list[StartRun],
    full: list[StartRun],
    references: dict[str, list[float]],
    count: int,
) -> None:
    print(f"1. start: spawn -> READY=1 (median and min of {len(full)} runs each, alternating)")
    print(
        f"  setup: {count:,} paused magnets added through the socket in {setup.seconds:.2f} s "
        f"({setup.counts.adds / setup.seconds:,.0f} adds/s, 10 connections x 10 in flight), "
        f"clean stop {setup.stop:.2f} s; {setup.resume_files:,} .fastresume files, "
        f"downloads.json {setup.state_bytes:,} B"
    )
    print(f"  {'':<62} {'median':>11}  {'min':>11}  {'max':>11}")

    def row(label: str, values: list[float]) -> None:
        valid = seen(values)
        if not valid:
            print(f"  {label:<62} {'not seen':>11}")
            return
        print(f"  {label:<62} {ms(median(valid))}  {ms(min(valid))}  {ms(max(valid))}")

    for label, runs in (("empty library", empty), (f"{count:,} persisted paused downloads", full)):
        row(f"{label}: spawn -> READY=1", [r.ready for r in runs])
        row("  spawn -> state loaded (log)", [r.loaded for r in runs])
        row("  spawn -> worker ready (log)", [r.worker for r in runs])
        row("  spawn -> replay done (log)", [r.replayed for r in runs])
        row("  the replay itself (its log line)", [r.replay for r in runs])
        row("  spawn -> first ping answered", [r.pinged for r in runs])
        row("  clean stop: SIGTERM -> exit 0", [r.stop for r in runs])
        resumed = sorted({r.resumed for r in runs})
        print(f"  {'  downloads replayed (log)':<62} {', '.join(str(n) for n in resumed):>11}")
    for label, values in references.items():
        row(f"reference: {label}", values)
    ready = median([r.ready for r in full])
    bare = median(references['python -c "import libtorrent"'])
    print(f"  {f'{count:,} downloads: READY=1 / bare import libtorrent':<62} {ready / bare:8.1f}x")
    print()


def print_adds(phases: list[AddPhase], raw: RawRates) -> None:
    print("2. durable adds: paused magnets, distinct random info hashes, fresh daemon per phase")
    print(
        f"  {'connections':>11}  {'in flight':>9}  {'adds':>6}  {'adds/s':>8}  {'p50':>9}  "
        f"{'p99':>9}  {'errors':>6}  {'downloads.json':>14}  {'written/add':>11}  "
        f"{'adds/write':>10}"
    )
    for phase in phases:
        errors = sum(phase.counts.errors.values())
        per_add = phase.written / max(1, phase.counts.adds)
        # Each write is the whole file, which grew from 0 to its final size during the phase.
        per_write = phase.state_bytes / 2 / per_add if per_add else math.nan
        print(
            f"  {phase.connections:>11}  {phase.connections * phase.in_flight:>9}  "
            f"{phase.counts.adds:>6,}  {phase.rate:>8,.1f}  "
            f"{percentile(phase.counts.latencies, 0.5) * 1000:>6.1f} ms  "
            f"{percentile(phase.counts.latencies, 0.99) * 1000:>6.1f} ms  {errors:>6}  "
            f"{phase.state_bytes:>12,} B  {per_add / KiB:>7.1f} KiB  {per_write:>10.1f}"
        )
        if errors:
            print(f"  note: errors {dict(phase.counts.errors)}")
    print(
        "  (written: bytes the daemon sent to storage, from /proc/<pid>/io; adds/write: estimated"
        "\n   from it and the mean size of downloads.json, which every write rewrites whole)"
    )
    print(
        f"  {'connections':>11}  {'CPU per add: daemon':>19}  {'its event loop':>14}  "
        f"{'its threads':>11}  {'worker':>9}  {'this client':>11}  {'busy':>5}"
    )
    for phase in phases:
        busy = (phase.daemon_cpu + phase.worker_cpu + phase.client_cpu) / phase.elapsed
        print(
            f"  {phase.connections:>11}  {ms(phase.per_add(phase.daemon_cpu)):>19}  "
            f"{ms(phase.per_add(phase.loop_cpu)):>14}  "
            f"{ms(phase.per_add(phase.daemon_cpu - phase.loop_cpu)):>11}  "
            f"{ms(phase.per_add(phase.worker_cpu)):>9}  {ms(phase.per_add(phase.client_cpu)):>11}"
            f"  {busy:>5.0%}"
        )
    print("  (busy: CPU of daemon + worker + this client over the phase; 100% = one core)")
    print(f"  {'raw write 4 KiB + fsync, same file':<62} {raw.fsync:>8,.1f} /s")
    label = f"raw atomic replace of {raw.replace_bytes:,} B (write, fsync, rename, fsync dir)"
    print(f"  {label:<62} {raw.replace:>8,.1f} /s")
    print("  (that size is the mean size of downloads.json during the 1-connection phase)")
    one = phases[0].rate
    print(f"  {'1 connection / raw atomic replace':<62} {one / raw.replace:8.2f}x")
    for phase in phases[1:]:
        label = f"{phase.connections} connections x {phase.in_flight} in flight / 1 connection"
        print(f"  {label:<62} {phase.rate / one:8.2f}x")
    print()


def print_completions(completions: Completions) -> None:
    info = lt.torrent_info(completions.payloads[0].torrent)
    bare, samples = completions.bare, completions.daemon
    print(
        f"3. completion latency: {len(samples)} download{'s' if len(samples) != 1 else ''} of "
        f"{completions.size // KiB} KiB "
        f"({info.num_pieces()} pieces of {info.piece_length() // KiB} KiB) from a loopback "
        "seeder in this process, one at a time"
    )
    print(TABLE.header())
    if bare:
        print(
            TABLE.row(
                f"calibration ({len(bare)}, bare session): finished -> last HAVE",
                [s.seeder.last_have - s.finished for s in bare],
            )
        )
        print(
            TABLE.row("  bare: finished alert -> popped", [s.received - s.finished for s in bare])
        )
    print(TABLE.row("last HAVE -> download.completed on socket", [s.latency for s in samples]))
    print(TABLE.row("last block out -> download.completed (bound)", [s.bound for s in samples]))
    print()


def print_memory(memory: Memory, empty: list[StartRun], full: list[StartRun], count: int) -> int:
    print(
        f"4. memory: idle {memory.idle:g} s with {RSS_DOWNLOADS} paused downloads "
        f"({RSS_TORRENT_BYTES // (1024 * MiB)} GiB torrents of {RSS_PIECE // MiB} MiB pieces)"
    )
    print(f"  {'':<60} {'VmRSS':>11}  {'RssAnon':>11}  {'RssFile':>11}  {'Pss':>11}  {'VmHWM':>11}")

    def row(label: str, found: dict[str, int]) -> None:
        cells = "  ".join(
            f"{mib(found[key]) if key in found else '':>11}"
            for key in ("VmRSS", "RssAnon", "RssFile", "Pss", "VmHWM")
        )
        print(f"  {label:<60} {cells}".rstrip())

    row("daemon (parent)", memory.daemon)
    for worker in memory.workers:
        row("worker (child)", worker)
    total = {
        key: memory.daemon.get(key, 0) + sum(w.get(key, 0) for w in memory.workers)
        for key in ("VmRSS", "RssAnon", "RssFile", "Pss", "VmHWM")
    }
    row("daemon + worker", total)
    for label, found in memory.references.items():
        row(f"reference: {label}", found)
    for label, runs in (("0 downloads", empty), (f"{count:,} paused magnets", full)):
        parent = median([float(r.daemon_rss) for r in runs])
        child = median([float(r.worker_rss) for r in runs])
        print(
            f"  {f'just after READY=1, {label} (median): daemon':<60} {mib(parent):>11}"
            f"   worker {mib(child)}   sum {mib(parent + child)}"
        )
    if len(memory.workers) != 1:
        print(f"  note: {len(memory.workers)} workers found")
    print()
    return total["VmRSS"]


def print_goals(
    full: list[StartRun],
    count: int,
    phases: list[AddPhase],
    completions: Completions,
    rss: int,
) -> None:
    ready = median([r.ready for r in full])
    ratio = phases[-1].rate / phases[0].rate
    latencies = [s.latency for s in completions.daemon]
    bounds = [s.bound for s in completions.daemon]
    worst_latency = worst(latencies)
    worst_bound = worst(bounds)
    all_seen = len(seen(latencies)) == len(latencies)
    last = phases[-1]
    print("goals")
    rows = (
        (
            f"start with {count:,} persisted: READY=1 <= {START_GOAL:g} s (median)",
            f"{ms(ready)}",
            ready <= START_GOAL,
        ),
        (
            f"adds: {last.connections} connections x {last.in_flight} in flight >= "
            f"{RATE_GOAL:g}x 1 connection",
            f"{ratio:8.2f}x",
            ratio >= RATE_GOAL,
        ),
        (
            f"completion on the socket < {LATENCY_GOAL * 1000:g} ms (max, from last HAVE)",
            f"{ms(worst_latency)}",
            all_seen and worst_latency < LATENCY_GOAL,
        ),
        (
            "  the same, upper bound (max, from last block out)",
            f"{ms(worst_bound)}",
            all_seen and worst_bound < LATENCY_GOAL,
        ),
        (
            f"daemon + worker VmRSS <= {RSS_GOAL // KiB} MiB, idle, {RSS_DOWNLOADS} downloads",
            f"{mib(rss)}",
            rss <= RSS_GOAL,
        ),
    )
    for label, value, met in rows:
        print(f"  {label:<62} {value:>11}   {verdict(met)}")


# --- main ----------------------------------------------------------------------------------------


def benchmark(space: Workspace, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    # 1. start
    setup = set_up_library(space, "full", args.downloads)
    empty: list[StartRun] = []
    full: list[StartRun] = []
    for run in range(args.runs):
        empty.append(start_once(space, "empty", run))
        full.append(start_once(space, "full", run))
    references = reference_starts(args.runs)
    # 2. durable adds
    phases = [add_phase(space, "adds-1", 1, 1, args.adds)]
    if args.in_flight > 1:  # for reference: as many clients each waiting for its ok
        phases.append(add_phase(space, "adds-n1", args.connections, 1, args.adds))
    phases.append(add_phase(space, "adds-n", args.connections, args.in_flight, args.adds))
    raw = raw_rates(space.root / "raw", phases[0].state_bytes // 2)
    # 3. completion latency
    completions = measure_completions(space, args.completions, args.size_kib, args.calibration)
    # 4. memory
    memory = measure_memory(space, args.idle)

    print_header(space, args, load)
    print_starts(setup, empty, full, references, args.downloads)
    print_adds(phases, raw)
    print_completions(completions)
    rss = print_memory(memory, empty, full, args.downloads)
    print_goals(full, args.downloads, phases, completions, rss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="dlkeeper end to end: start to READY=1, durable add rate, completion "
        "latency through the socket, idle memory of daemon + worker."
    )
    parser.add_argument("--runs", type=int, default=5, help="starts of each kind (default: 5)")
    parser.add_argument(
        "--downloads",
        type=int,
        default=1000,
        help="persisted paused downloads for the start (default: %(default)s)",
    )
    parser.add_argument(
        "--adds",
        type=int,
        default=2000,
        help="adds in each add phase, after the warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--connections", type=int, default=10, help="connections of the concurrent add phase"
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=10,
        help="adds in flight per connection in the concurrent phase (default: %(default)s)",
    )
    parser.add_argument(
        "--completions", type=int, default=12, help="downloads to time (default: %(default)s)"
    )
    parser.add_argument(
        "--size-kib", type=int, default=1024, help="size of each download (default: %(default)s)"
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=5,
        help="downloads by a bare libtorrent session first (default: %(default)s; 0: none)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="idle time before memory is read (default: %(default)s)",
    )
    add_dir_argument(parser)
    args = parser.parse_args(argv)
    counts = (args.runs, args.downloads, args.adds, args.connections, args.in_flight)
    if min(*counts, args.completions) < 1:
        parser.error("--runs, --downloads, --adds, --connections, --in-flight, --completions: >= 1")
    if args.idle < 0 or args.calibration < 0:
        parser.error("--idle and --calibration must not be negative")
    if args.size_kib < 16:
        parser.error("--size-kib must be at least 16")
    check_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dlkeeper-bench-", dir=args.dir))
    sockets = Path(tempfile.mkdtemp(prefix="dkbench-s"))
    try:
        benchmark(Workspace(root, sockets), args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
