"""Benchmark of durable mutations through the persistence actor; run by hand, prints only.

    .venv/bin/python scripts/bench_persistence.py [--duration SECONDS] [--dir DIR]

On a state of 1,000 realistic downloads it measures durable mutations per second
(`await persistence.update(task_id, RecordChanges(progress=...))`) with 1, 10 and 100 concurrent
callers, and compares one durable write of the state (`StateStore.write` after one change) with a
raw write+fsync of the same bytes. Goals (from the issue): 100 concurrent callers reach at least
10x the rate of one, and one durable write costs at most 3x the raw write+fsync.

Everything happens in a fresh temporary folder (under `--dir` when given, to measure a real disk
such as an SD card), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from benchlib import (
    add_dir_argument,
    check_dir,
    cores,
    filesystem_of,
    in_work_dir,
    ms,
    percentile,
    print_platform,
    verdict,
)

from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from actors.persistence import Persistence, PersistenceActor
from actors.state import DownloadRecord, DownloadStatus, MigrationContext
from actors.statefile import StateStore

ENTRIES = 1_000
CALLER_COUNTS = (1, 10, 100)
RATE_GOAL = 10.0  # rate(100 callers) / rate(1 caller) at least this
WRITE_GOAL = 3.0  # durable write / raw write+fsync at most this
SEED = 20261124

_TRACKERS = (
    "udp://tracker.opentrackr.org:1337/announce",
    "udp://open.stealth.si:80/announce",
    "udp://tracker.torrent.eu.org:451/announce",
    "udp://exodus.desync.com:6969/announce",
    "https://tracker.gbitt.info:443/announce",
)
_WORDS = (
    "The", "Long", "Night", "Winter", "River", "Signal", "Harbor", "Glass", "Orbit", "Echo",
    "Quiet", "Empire", "Lantern", "Nomad", "Cinder", "Atlas", "Meridian", "Drift", "Crown", "Tide",
)  # fmt: skip


# --- the state ----------------------------------------------------------------------------------


def make_record(index: int, rng: random.Random, download_path: Path) -> DownloadRecord:
    """One download as the media bot would create it: a magnet, metadata, file priorities."""
    title = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))
    year = rng.randint(1970, 2026)
    season = rng.randint(1, 9) if rng.random() < 0.4 else None
    info_hash = rng.randbytes(20).hex()
    quality = rng.choice(("1080p", "2160p", "720p"))
    release = f"{title.replace(' ', '.')}.{year}.{quality}.WEB-DL.x264-GRP"
    if season is not None:
        release = f"{title.replace(' ', '.')}.S{season:02d}.{quality}.WEB-DL.x265-GRP"
    trackers = rng.sample(_TRACKERS, k=rng.randint(2, len(_TRACKERS)))
    magnet = f"magnet:?xt=urn:btih:{info_hash}&dn={release}" + "".join(
        f"&tr={tracker.replace(':', '%3A').replace('/', '%2F')}" for tracker in trackers
    )
    file_count = rng.randint(6, 14) if season is not None else rng.randint(1, 3)
    piece_length = rng.choice((262_144, 1_048_576, 4_194_304))
    sizes = [rng.randint(200_000_000, 4_000_000_000) for _ in range(file_count)]
    files = [
        {
            "path": f"{release}/{release}.E{n + 1:02d}.mkv" if season else f"{release}.mkv",
            "size": size,
        }
        for n, size in enumerate(sizes)
    ]
    total = sum(sizes)
    status = rng.choices(
        list(DownloadStatus), weights=(30, 40, 10, 15, 5), k=1
    )[0]  # fmt: skip
    created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 30_000_000))
    torrent_metadata: dict[str, Any] = {
        "name": release,
        "total_size": total,
        "piece_length": piece_length,
        "num_pieces": -(-total // piece_length),
        "files": files,
        "trackers": trackers,
        "comment": "",
        "created_by": "mktorrent 1.1",
    }
    validation_metadata: dict[str, Any] = {
        "requested_by": rng.randint(10_000_000, 9_999_999_999),
        "chat_id": -rng.randint(1_000_000_000_000, 1_009_999_999_999),
        "query": title.lower(),
        "title": title,
        "year": year,
        "imdb_id": f"tt{rng.randint(100_000, 29_999_999):07d}",
        "season": season,
        "checked_at": (created + timedelta(seconds=rng.randint(1, 60))).isoformat(),
        "source": rng.choice(("search", "link", "watchlist")),
        "min_seeders": 3,
    }
    return DownloadRecord(
        task_id=f"task-{index:04d}-{rng.randbytes(4).hex()}",
        name=release,
        info_hash=info_hash,
        created_at=created,
        status=status,
        magnet_link=magnet,
        save_path=str(download_path / ("tv" if season else "movies")),
        file_priorities=tuple(rng.choice((0, 1, 4, 4, 4, 7)) for _ in range(file_count)),
        peers=tuple(
            f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
            f"{rng.randint(1, 254)}:{rng.randint(1024, 65535)}"
            for _ in range(rng.randint(0, 4))
        ),
        torrent_metadata=torrent_metadata,
        validation_metadata=validation_metadata,
        progress=round(rng.random(), 4) if status is not DownloadStatus.QUEUED else 0.0,
        completed_at=created + timedelta(hours=3) if status is DownloadStatus.COMPLETED else None,
        error="tracker: connection timed out" if status is DownloadStatus.FAILED else None,
    )


# --- measurements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseResult:
    callers: int
    mutations: int  # completed by the callers
    committed: int  # committed_mutations counted by the actor
    writes: int
    elapsed: float
    latencies: list[float]  # seconds, one per mutation

    @property
    def rate(self) -> float:
        return self.mutations / self.elapsed

    @property
    def write_rate(self) -> float:
        return self.writes / self.elapsed

    @property
    def per_write(self) -> float:
        return self.committed / self.writes if self.writes else 0.0


@dataclass(frozen=True)
class Setup:
    seconds: float
    writes: int


def median(values: list[float]) -> float:
    return percentile(sorted(values), 0.5)


async def setup_state(persistence: Persistence, records: list[DownloadRecord]) -> Setup:
    """Adds every record through the actor, all at once (they commit in a few group writes)."""
    start = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for record in records:
            task_group.start_soon(persistence.add, record)
    seconds = time.perf_counter() - start
    stats = await persistence.stats()
    return Setup(seconds=seconds, writes=stats.writes)


async def run_phase(
    persistence: Persistence, task_ids: list[str], callers: int, duration: float
) -> PhaseResult:
    """`callers` tasks, each updating its own downloads one after another until the deadline."""
    before = await persistence.stats()
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start = time.perf_counter()
    deadline = start + duration

    async def caller(number: int) -> None:
        own = task_ids[number::callers]
        mine = latencies[number]
        step = 0
        while time.perf_counter() < deadline:
            task_id = own[step % len(own)]
            progress = (step % 997) / 1000  # always a different value from the last one
            began = time.perf_counter()
            await persistence.update(task_id, RecordChanges(progress=progress))
            mine.append(time.perf_counter() - began)
            step += 1

    async with anyio.create_task_group() as task_group:
        for number in range(callers):
            task_group.start_soon(caller, number)
    elapsed = time.perf_counter() - start
    after = await persistence.stats()
    flat = sorted(latency for own in latencies for latency in own)
    return PhaseResult(
        callers=callers,
        mutations=len(flat),
        committed=after.committed_mutations - before.committed_mutations,
        writes=after.writes - before.writes,
        elapsed=elapsed,
        latencies=flat,
    )


@dataclass(frozen=True)
class WriteComparison:
    raw: list[float]
    durable: list[float]


def compare_writes(store: StateStore, budget: float) -> WriteComparison:
    """Interleaves raw write+fsync of the state's bytes with `StateStore.write` after one change.

    Runs at least 10 pairs and until `budget` seconds have passed (at most 500 pairs).
    """
    data = store.path.read_bytes()
    store.acquire_lock()
    try:
        downloads, _ = store.load()
        store.write(downloads)  # fills the store's cache of encoded records, like a running daemon
        task_ids = list(downloads)
        raw: list[float] = []
        durable: list[float] = []
        started = time.perf_counter()
        n = 0
        while n < 10 or (time.perf_counter() - started < budget and n < 500):
            raw.append(_timed_raw_write(store.directory / f"raw-{n}.json", data))
            task_id = task_ids[n % len(task_ids)]
            downloads[task_id] = downloads[task_id].model_copy(
                update={"progress": (n % 997) / 1000}
            )
            durable.append(_timed(lambda: store.write(downloads)))
            n += 1
    finally:
        store.release_lock()
    return WriteComparison(raw=raw, durable=durable)


def _timed_raw_write(path: Path, data: bytes) -> float:
    began = time.perf_counter()
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    seconds = time.perf_counter() - began
    path.unlink()
    return seconds


def _timed(action: Callable[[], None]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


# --- output -------------------------------------------------------------------------------------


def print_header(directory: Path, state_bytes: int, setup: Setup, duration: float) -> None:
    print("dlkeeper persistence benchmark")
    print_platform()
    print(f"  cores        {cores()}")
    print(f"  directory    {directory}")
    print(f"  filesystem   {filesystem_of(directory)}")
    print(f"  state        {ENTRIES:,} downloads, downloads.json is {state_bytes:,} bytes")
    print(
        f"  setup        {ENTRIES:,} concurrent adds through the actor: "
        f"{setup.seconds:.2f} s, {setup.writes} writes"
    )
    print(f"  duration     {duration:g} s per measurement")
    print()


def print_phases(phases: list[PhaseResult]) -> dict[int, float]:
    print("durable mutations: await persistence.update(task_id, RecordChanges(progress=...))")
    print(
        f"  {'callers':>7}  {'mutations':>9}  {'mutations/s':>11}  {'writes/s':>9}  "
        f"{'mutations/write':>15}  {'p50 latency':>11}  {'p99 latency':>11}"
    )
    for phase in phases:
        print(
            f"  {phase.callers:>7}  {phase.mutations:>9,}  {phase.rate:>11,.1f}  "
            f"{phase.write_rate:>9,.1f}  {phase.per_write:>15.2f}  "
            f"{ms(percentile(phase.latencies, 0.5), 2):>11}  "
            f"{ms(percentile(phase.latencies, 0.99), 2):>11}"
        )
    rates = {phase.callers: phase.rate for phase in phases}
    for phase in phases:
        if phase.committed != phase.mutations:
            print(
                f"  note: {phase.callers} callers completed {phase.mutations} mutations, "
                f"the actor counted {phase.committed}"
            )
    print()
    for callers in CALLER_COUNTS[1:]:
        print(f"  rate({callers})/rate(1)  {rates[callers] / rates[1]:>7.2f}x")
    print()
    return rates


def print_writes(comparison: WriteComparison, single: PhaseResult) -> float:
    raw = median(comparison.raw)
    durable = median(comparison.durable)
    mutation = percentile(single.latencies, 0.5)
    print(f"one write of the {ENTRIES:,}-entry state (median of {len(comparison.raw)} each)")
    rows = (
        ("raw open/write/flush/fsync/close, new file", raw, ""),
        ("StateStore.write, one record changed", durable, f"{durable / raw:6.2f}x raw"),
        ("one mutation, 1 caller (p50 latency)", mutation, f"{mutation / raw:6.2f}x raw"),
    )
    for label, seconds, ratio in rows:
        print(f"  {label:<44} {ms(seconds, 2)}  {ratio}".rstrip())
    print()
    return durable / raw


def print_goals(rates: dict[int, float], write_ratio: float) -> None:
    rate_ratio = rates[100] / rates[1]
    print("goals")
    print(
        f"  100 callers >= {RATE_GOAL:g}x the rate of 1 caller      "
        f"{rate_ratio:6.2f}x   {verdict(rate_ratio >= RATE_GOAL)}"
    )
    print(
        f"  durable write <= {WRITE_GOAL:g}x raw write+fsync          "
        f"{write_ratio:6.2f}x   {verdict(write_ratio <= WRITE_GOAL)}"
    )


# --- main ---------------------------------------------------------------------------------------


async def benchmark(directory: Path, duration: float) -> None:
    rng = random.Random(SEED)
    download_path = directory / "downloads"
    records = [make_record(index, rng, download_path) for index in range(ENTRIES)]
    task_ids = [record.task_id for record in records]
    store = StateStore(directory / "data", MigrationContext(download_path=download_path))

    phases: list[PhaseResult] = []
    async with actor_group() as group:
        persistence = Persistence(await group.start(PersistenceActor(store)))
        setup = await setup_state(persistence, records)
        await run_phase(persistence, task_ids, 1, min(0.5, duration / 4))  # warm-up
        for callers in CALLER_COUNTS:
            phases.append(await run_phase(persistence, task_ids, callers, duration))
    # The actor has stopped and released the lock; the reference runs on the same state.
    comparison = compare_writes(store, budget=duration)

    print_header(directory, store.path.stat().st_size, setup, duration)
    rates = print_phases(phases)
    write_ratio = print_writes(comparison, phases[0])
    print_goals(rates, write_ratio)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Durable mutations per second through the persistence actor "
        f"({ENTRIES:,}-entry state), and one durable write against a raw write+fsync."
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=4.0,
        metavar="SECONDS",
        help="length of each measurement (default: %(default)s)",
    )
    add_dir_argument(
        parser,
        "measure on this folder's disk; a temporary folder is made inside it and removed "
        "(default: the system's temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    check_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_work_dir(
        args.dir,
        lambda directory: anyio.run(benchmark, directory, args.duration, backend="asyncio"),
    )


if __name__ == "__main__":
    sys.exit(main())
