"""Replay of 1,000 paused downloads into a fresh worker, and the worker's idle memory; prints only.

    PYTHONPATH=. .venv/bin/python scripts/bench_replay.py [--runs N] [--downloads N]
        [--pieces N] [--idle SECONDS] [--dir DIR]

Setup (not timed): `--downloads` distinct small .torrent files (one file of `--pieces` 16 KiB
pieces each, made here with a few lines of bencoding; no payload is needed for a paused
download), each persisted through a PersistenceActor as a PAUSED DownloadRecord. Their
.fastresume files are the worker's own: a session actor replays them once (without resume data),
`save_resume_data(only_if_modified=False)` writes every `{torrents_dir}/{task_id}.fastresume`,
and the actors stop.

Measured, `--runs` times, alternating which goes first:

- dlkeeper: in an actor group whose PersistenceActor is already running (state loaded), from
  `group.start(SessionActor(...))` until `await session.wait_replayed(...)` returns: the worker
  process spawned, its session configured, every record read with its .torrent and .fastresume
  and added. The session actor's own log lines split this into spawn -> ready and the replay.
- bare libtorrent, for reference: a child process (`python -c` running `bare_child` alone) that
  imports libtorrent, makes a session with the same settings, then reads the same .fastresume
  files, `read_resume_data` + `async_add_torrent` for each, and waits for every
  `add_torrent_alert`. It reports the adds alone; the parent also times the whole process.

And once: the start cost of a bare `python -c pass`, of `python -c "import libtorrent"`, and of
the worker itself (spawned and sent `configure` over the real protocol, until `ready`).

Memory (the issue's item 4, here): the worker's VmRSS (from /proc/<worker_pid>/status, the pid
from `await session.stats()`) after `--idle` seconds idle, with 0 downloads (an empty library)
and with the replayed ones; the bare libtorrent child's VmRSS with the same torrents; and this
process's, which plays the daemon's parent (actors, 1,000 records; it never imports libtorrent,
which stays in the worker, the bare child and the setup).

Goal (from the issue): the replay of 1,000 paused downloads, process start included, within 1 s
(bare libtorrent adds them in about 25 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import anyio
from benchlib import (
    add_dir_argument,
    check_dir,
    cores,
    cpu_of,
    in_work_dir,
    memory_of,
    mib,
    ms,
    print_platform,
    time_command,
    timed_run,
    verdict,
)

from actors.layout import Layout
from actors.mailbox import actor_group
from actors.messages.session import SessionEvent
from actors.messages.worker import WORKER_OUTPUT, ConfigureSession, WorkerReady
from actors.metainfo import bencode
from actors.persistence import Persistence, PersistenceActor
from actors.session import Session, SessionActor, SessionOptions
from actors.state import DownloadRecord, DownloadStatus, MigrationContext
from actors.statefile import StateStore
from supervisor.loopback import LOOPBACK_SETTINGS  # imports nothing: no libtorrent here

GOAL = 1.0  # seconds for the replay, worker start included
PIECE = 16 * 1024
STARTS = 5  # repetitions of each process-start measurement
DEADLINE = 120.0


# --- the library ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    """A library in `root`, its downloads in `root/downloads` (paths from actors.layout)."""

    root: Path

    @property
    def layout(self) -> Layout:
        return Layout(library_path=self.root, download_path=self.root / "downloads")

    @property
    def download_dir(self) -> Path:
        return self.layout.download_path

    @property
    def torrents_dir(self) -> Path:
        return self.layout.torrents_dir

    def store(self) -> StateStore:
        return StateStore(self.layout.state_dir, MigrationContext(download_path=self.download_dir))

    def options(self) -> SessionOptions:
        return SessionOptions(layout=self.layout, libtorrent=LOOPBACK_SETTINGS)


def _key(key: object) -> bytes:
    return key.encode() if isinstance(key, str) else cast(bytes, key)


def make_records(library: Library, count: int, pieces: int) -> list[DownloadRecord]:
    """`count` distinct single-file .torrent files in the torrents folder, and their records."""
    library.torrents_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    records = []
    for number in range(count):
        task_id = f"replay-{number:04d}"
        name = f"Replay {number:04d}.mkv"
        hashes = b"".join(
            hashlib.sha1(f"{task_id}/{piece}".encode()).digest() for piece in range(pieces)
        )
        info = {"name": name, "length": pieces * PIECE, "piece length": PIECE, "pieces": hashes}
        torrent = bencode({"info": info, "created by": "dlkeeper bench_replay"})
        path = library.layout.torrent_path(task_id)
        path.write_bytes(torrent)
        records.append(
            DownloadRecord(
                task_id=task_id,
                name=name,
                info_hash=hashlib.sha1(bencode(info)).hexdigest(),
                created_at=created,
                status=DownloadStatus.PAUSED,
                torrent_file_path=str(path),
                save_path=str(library.download_dir),
            )
        )
    return records


@dataclass(frozen=True)
class Setup:
    persist: float
    first_replay: float
    saved: int
    resume_files: int


async def set_up(library: Library, records: list[DownloadRecord]) -> Setup:
    """Persists the records, replays them once and saves every download's resume data."""
    publish, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
    with events:
        async with actor_group() as group:
            persistence = Persistence(await group.start(PersistenceActor(library.store())))
            began = time.perf_counter()
            async with anyio.create_task_group() as task_group:
                for record in records:
                    task_group.start_soon(persistence.add, record)
            persisted = time.perf_counter()
            session = Session(
                await group.start(SessionActor(library.options(), persistence, publish))
            )
            await session.wait_replayed(timeout=DEADLINE)
            replayed = time.perf_counter()
            saved = await session.save_resume_data(only_if_modified=False)
    resume_files = len(list(library.torrents_dir.glob("*.fastresume")))
    return Setup(persisted - began, replayed - persisted, saved.saved, resume_files)


# --- measurements --------------------------------------------------------------------------------


class SessionLog(logging.Handler):
    """Keeps the session actor's log records: when the worker was ready, how long the replay."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def ready_at(self) -> float:
        return self._first(lambda record: "listening on port" in record.msg, math.nan)

    def replay_seconds(self) -> float:
        for record in self.records:
            if str(record.msg).startswith("replayed ") and isinstance(record.args, tuple):
                return float(cast(float, record.args[-1]))
        return math.nan

    def _first(self, matching: Callable[[logging.LogRecord], bool], default: float) -> float:
        for record in self.records:
            if isinstance(record.msg, str) and matching(record):
                return record.created
        return default


@dataclass(frozen=True)
class Replay:
    seconds: float  # group.start(SessionActor) -> wait_replayed() returned
    to_ready: float  # -> the worker's ready (from the actor's log)
    replay: float  # the replay itself, as the actor logs it
    resumed: int
    failures: int
    worker_cpu: float  # seconds of CPU the worker used from its spawn to the end of the replay
    parent_cpu: float  # seconds of CPU this process used meanwhile
    stop: float  # leaving the actor group: resume data of all saved, the worker stopped
    worker_rss: int  # KiB, after the idle time
    worker_peak: int  # KiB, VmHWM
    parent_rss: int  # KiB


async def replay_once(library: Library, idle: float, log: SessionLog) -> Replay:
    log.records.clear()
    publish, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
    with events:
        async with actor_group() as group:
            persistence = Persistence(await group.start(PersistenceActor(library.store())))
            began_wall = time.time()
            began_cpu = time.process_time()
            began = time.perf_counter()
            actor = SessionActor(library.options(), persistence, publish)
            session = Session(await group.start(actor))
            await session.wait_replayed(timeout=DEADLINE)
            seconds = time.perf_counter() - began
            parent_cpu = time.process_time() - began_cpu
            stats = await session.stats()
            assert stats.worker_pid is not None
            worker_cpu = cpu_of(stats.worker_pid)
            await anyio.sleep(idle)
            worker = memory_of(stats.worker_pid)
            parent = memory_of(os.getpid())
            stopping = time.perf_counter()
        stop = time.perf_counter() - stopping
    return Replay(
        seconds=seconds,
        to_ready=log.ready_at() - began_wall,
        replay=log.replay_seconds(),
        resumed=stats.resumed_at_start,
        failures=stats.resume_failures,
        worker_cpu=worker_cpu,
        parent_cpu=parent_cpu,
        stop=stop,
        worker_rss=worker["VmRSS"],
        worker_peak=worker["VmHWM"],
        parent_rss=parent["VmRSS"],
    )


@dataclass(frozen=True)
class Bare:
    process: float  # spawn -> the child's exit (import, session, adds, report)
    adds: float  # reading the files, read_resume_data + async_add_torrent, every add alert
    reads: float  # of which reading the files
    session: float  # lt.session(...) in the child
    import_seconds: float
    added: int
    rss: int  # KiB, the child with every torrent added


def bare_reference(torrents_dir: Path) -> Bare:
    """Runs `bare_child` in a fresh interpreter that imports nothing of dlkeeper."""
    settings = json.dumps(LOOPBACK_SETTINGS)
    code = f"{inspect.getsource(bare_child)}\nbare_child({str(torrents_dir)!r}, {settings!r})\n"
    process, stdout = timed_run([sys.executable, "-c", code], capture=True)
    report = json.loads(stdout)
    return Bare(
        process=process,
        adds=report["adds"],
        reads=report["reads"],
        session=report["session"],
        import_seconds=report["import"],
        added=report["added"],
        rss=report["rss"],
    )


def bare_child(torrents_dir: str, settings_json: str) -> None:
    """The child's side, self-contained: prints one JSON line of seconds and its VmRSS (KiB)."""
    import json  # noqa: PLC0415 - the child runs this function's source alone
    import time  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415
    from typing import cast  # noqa: PLC0415

    began = time.perf_counter()
    import libtorrent as lt  # noqa: PLC0415

    imported = time.perf_counter()
    mask = (
        lt.alert.category_t.error_notification
        | lt.alert.category_t.status_notification
        | lt.alert.category_t.storage_notification
    )
    settings = {**json.loads(settings_json), "alert_mask": int(mask), "alert_queue_size": 10_000}
    session = lt.session(cast("lt.settings_pack", settings))
    created = time.perf_counter()
    paths = sorted(Path(torrents_dir).glob("*.fastresume"))
    resume_data = [path.read_bytes() for path in paths]
    read = time.perf_counter()
    for data in resume_data:
        session.async_add_torrent(lt.read_resume_data(data))
    added = failed = 0
    deadline = time.monotonic() + 120
    while added + failed < len(paths) and time.monotonic() < deadline:
        session.wait_for_alert(1000)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.add_torrent_alert):
                failed += 1 if alert.error.value() else 0
                added += 0 if alert.error.value() else 1
    done = time.perf_counter()
    status = Path("/proc/self/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    report = {
        "import": imported - began,
        "session": created - imported,
        "adds": done - created,
        "reads": read - created,
        "added": added,
        "rss": rss,
    }
    print(json.dumps(report), flush=True)


def worker_start(options: SessionOptions) -> float:
    """Spawn -> `ready` of one worker over the real protocol; then it is asked to stop."""
    began = time.perf_counter()
    worker = subprocess.Popen(
        list(options.worker_command), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert worker.stdin is not None
        assert worker.stdout is not None
        configure = ConfigureSession(id=0, settings=dict(options.libtorrent))
        worker.stdin.write(configure.model_dump_json().encode() + b"\n")
        worker.stdin.flush()
        while True:
            line = worker.stdout.readline()
            if not line:
                raise RuntimeError("the worker exited before it was ready")
            if isinstance(WORKER_OUTPUT.validate_json(line), WorkerReady):
                return time.perf_counter() - began
    finally:
        if worker.stdin is not None:
            worker.stdin.close()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


@dataclass
class Starts:
    python: list[float] = field(default_factory=list)
    import_libtorrent: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)


def measure_starts(options: SessionOptions) -> Starts:
    starts = Starts()
    for _ in range(STARTS):
        starts.python.append(time_command([sys.executable, "-c", "pass"]))
        starts.import_libtorrent.append(time_command([sys.executable, "-c", "import libtorrent"]))
        starts.worker.append(worker_start(options))
    return starts


# --- output --------------------------------------------------------------------------------------


def print_header(library: Library, count: int, pieces: int, setup: Setup) -> None:
    torrents = list(library.torrents_dir.glob("*.torrent"))
    resumes = list(library.torrents_dir.glob("*.fastresume"))
    torrent_bytes = sum(path.stat().st_size for path in torrents) / max(1, len(torrents))
    resume_bytes = sum(path.stat().st_size for path in resumes) / max(1, len(resumes))
    state = library.store().path.stat().st_size
    print("dlkeeper replay benchmark")
    print_platform()
    print(f"  cores        {cores()}")
    print(f"  directory    {library.root}")
    print(
        f"  downloads    {count:,} paused, one file of {pieces} x 16 KiB pieces each; "
        f".torrent {torrent_bytes:,.0f} B, .fastresume {resume_bytes:,.0f} B on average; "
        f"downloads.json {state:,} B"
    )
    print(
        f"  setup        persisted in {setup.persist:.2f} s; first replay (no resume data) "
        f"{setup.first_replay:.2f} s; resume data saved for {setup.saved:,}, "
        f"{setup.resume_files:,} .fastresume files"
    )
    print()


def print_starts(starts: Starts) -> None:
    print(f"process start (median and min of {STARTS})")
    rows = (
        ("python -c pass", starts.python),
        ('python -c "import libtorrent"', starts.import_libtorrent),
        ("worker: spawn -> ready (configure answered)", starts.worker),
    )
    for label, values in rows:
        print(f"  {label:<48} {ms(statistics.median(values))}  {ms(min(values))}")
    print()


def print_replays(replays: list[Replay], bares: list[Bare], count: int) -> None:
    print(f"replay of {count:,} paused downloads with resume data into a fresh worker")
    print(
        f"  {'run':>3}  {'dlkeeper':>11}  {'to ready':>11}  {'replay':>11}  {'resumed':>7}  "
        f"{'worker CPU':>11}  {'parent CPU':>11}  {'stop':>11}  {'bare adds':>11}  "
        f"{'bare process':>12}"
    )
    for number, (replay, bare) in enumerate(zip(replays, bares, strict=True)):
        print(
            f"  {number + 1:>3}  {ms(replay.seconds):>11}  {ms(replay.to_ready):>11}  "
            f"{ms(replay.replay):>11}  {replay.resumed:>7,}  {ms(replay.worker_cpu):>11}  "
            f"{ms(replay.parent_cpu):>11}  {ms(replay.stop):>11}  {ms(bare.adds):>11}  "
            f"{ms(bare.process):>12}"
        )
    print()
    rows: tuple[tuple[str, list[float]], ...] = (
        ("dlkeeper: start SessionActor -> wait_replayed()", [r.seconds for r in replays]),
        ("  of which spawn -> ready (actor's log)", [r.to_ready for r in replays]),
        ("  of which the replay (actor's log)", [r.replay for r in replays]),
        ("  CPU used by the worker (spawn to replayed)", [r.worker_cpu for r in replays]),
        ("  CPU used by the parent meanwhile", [r.parent_cpu for r in replays]),
        ("dlkeeper: stop (save all resume data, worker exit)", [r.stop for r in replays]),
        ("bare libtorrent: read + add + every add alert", [b.adds for b in bares]),
        ("  of which reading the .fastresume files", [b.reads for b in bares]),
        ("bare libtorrent: lt.session()", [b.session for b in bares]),
        ("bare libtorrent: import libtorrent", [b.import_seconds for b in bares]),
        ("bare libtorrent: whole process (spawn to exit)", [b.process for b in bares]),
    )
    print(f"  {'':<52} {'median':>11}  {'min':>11}")
    for label, values in rows:
        print(f"  {label:<52} {ms(statistics.median(values))}  {ms(min(values))}")
    dlkeeper = statistics.median(r.seconds for r in replays)
    adds = statistics.median(b.adds for b in bares)
    process = statistics.median(b.process for b in bares)
    print(f"  dlkeeper / bare adds             {dlkeeper / adds:8.1f}x")
    print(f"  dlkeeper / bare whole process    {dlkeeper / process:8.1f}x")
    bad = [r for r in replays if r.resumed != count or r.failures]
    bare_bad = [b for b in bares if b.added != count]
    if bad or bare_bad:
        print(f"  note: {len(bad)} dlkeeper runs and {len(bare_bad)} bare runs did not add all")
    print()


def print_memory(empty: Replay, replays: list[Replay], bares: list[Bare], count: int) -> None:
    print("memory (VmRSS after the idle time; peak is VmHWM)")
    rss = statistics.median(r.worker_rss for r in replays)
    peak = max(r.worker_peak for r in replays)
    print(f"  {'worker, 0 downloads':<52} {mib(empty.worker_rss)}   peak {mib(empty.worker_peak)}")
    print(f"  {f'worker, {count:,} paused downloads (median)':<52} {mib(rss)}   peak {mib(peak)}")
    bare = statistics.median(b.rss for b in bares)
    print(f"  {f'bare libtorrent process, the same {count:,}':<52} {mib(bare)}")
    parent_empty = empty.parent_rss
    parent = max(r.parent_rss for r in replays)
    loaded = "libtorrent loaded" if "libtorrent" in sys.modules else "no libtorrent"
    print(f"  {f'parent (this process, {loaded}), 0 downloads':<52} {mib(parent_empty)}")
    print(f"  {f'parent, {count:,} records (max)':<52} {mib(parent)}")
    print()


def print_goal(replays: list[Replay]) -> None:
    median = statistics.median(r.seconds for r in replays)
    print("goal")
    print(
        f"  replay incl. worker start <= {GOAL:g} s (median)                   "
        f"{ms(median)}   {verdict(median <= GOAL)}"
    )


# --- main ----------------------------------------------------------------------------------------


def benchmark(directory: Path, runs: int, count: int, pieces: int, idle: float) -> None:
    log = SessionLog()
    session_logger = logging.getLogger("actors.session")
    session_logger.addHandler(log)
    session_logger.setLevel(logging.INFO)
    try:
        # First, while this process holds no records: the parent's own baseline too.
        empty = anyio.run(replay_once, Library(directory / "empty"), idle, log, backend="asyncio")
        library = Library(directory / "library")
        records = make_records(library, count, pieces)
        setup = anyio.run(set_up, library, records, backend="asyncio")
        if setup.resume_files != count:
            raise RuntimeError(f"setup left {setup.resume_files} .fastresume files, not {count}")
        starts = measure_starts(library.options())
        replays: list[Replay] = []
        bares: list[Bare] = []
        for number in range(runs):
            if number % 2:
                bares.append(bare_reference(library.torrents_dir))
            replays.append(anyio.run(replay_once, library, idle, log, backend="asyncio"))
            if not number % 2:
                bares.append(bare_reference(library.torrents_dir))
    finally:
        session_logger.removeHandler(log)
    print_header(library, count, pieces, setup)
    print_starts(starts)
    print_replays(replays, bares, count)
    print_memory(empty, replays, bares, count)
    print_goal(replays)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Replay of paused downloads with resume data into a fresh worker (process "
        "start included), against bare libtorrent; and the worker's idle memory."
    )
    parser.add_argument("--runs", type=int, default=5, help="repetitions (default: 5)")
    parser.add_argument(
        "--downloads", type=int, default=1000, help="paused downloads (default: %(default)s)"
    )
    parser.add_argument(
        "--pieces", type=int, default=4, help="16 KiB pieces per torrent (default: %(default)s)"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="idle time before memory is read (default: %(default)s)",
    )
    add_dir_argument(parser)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.downloads < 1 or args.pieces < 1:
        parser.error("--runs, --downloads and --pieces must be at least 1")
    if args.idle < 0:
        parser.error("--idle must not be negative")
    check_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_work_dir(
        args.dir,
        lambda directory: benchmark(directory, args.runs, args.downloads, args.pieces, args.idle),
    )


if __name__ == "__main__":
    sys.exit(main())
