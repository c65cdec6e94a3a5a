"""Download throughput through the session actor against bare libtorrent; run by hand, prints only.

    PYTHONPATH=. .venv/bin/python scripts/bench_throughput.py [--runs N] [--size-mib MIB]
        [--dir DIR]

A payload of `--size-mib` MiB in two files (5/8 and 3/8 of it) is seeded by one loopback
libtorrent session in this process (`tests.swarm.seeding`). Every run downloads it twice, each
time into a fresh folder and from a fresh downloader:

- dlkeeper: the persistence and session actors (`tests.sessions.running_session`: the worker
  process with `LOOPBACK_SETTINGS`), the download added as the daemon adds it (persisted, then
  started, with the seeder as its peer). Timed from the add call to the `DownloadFinished`
  event the session actor publishes.
- raw: a bare `lt.session` in this process with the same `LOOPBACK_SETTINGS` (plus the alert
  mask the worker uses, so that `torrent_finished_alert` is posted), the same peer, and
  libtorrent's default add flags (paused + auto-managed, as the worker adds). Timed from
  `async_add_torrent` to the `torrent_finished_alert` popped.

The two alternate which goes first (dlkeeper first in odd runs), after one bare download that
is not counted (the first download from a fresh seeder is slower, whoever makes it). The worker
is spawned and the bare session created before the clock starts. Both downloaders add at once
to a new session, and libtorrent's queue starts an auto-managed torrent at a session tick, so
part of each time is that wait: the `start` column is the time from the add call to the
seeder's `peer_connect_alert` for the downloader, and `xfer/s` the rate from there to the end.

After each run, outside the timed part, every file of both downloads is hashed and compared with
the payload, so a broken download cannot look fast; a broken file is reported with its number of
bad 16 KiB blocks. Both are checked after their downloader stopped: bare libtorrent 2.1 reports
a torrent finished before it has necessarily written every block (dlkeeper's worker holds the
event until a disk flush, which is part of its measured time).

The score is the median over runs of raw time / dlkeeper time: dlkeeper's throughput as a share
of raw libtorrent's. Goal (from the issue): at least 0.95. On a small shared machine single runs
scatter by +-20 %; `--runs 12` gives a steadier median.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import libtorrent as lt
from benchlib import (
    DIR_HELP,
    add_dir_argument,
    check_dir,
    cores,
    filesystem_of,
    in_work_dir,
    print_platform,
    verdict,
)
from benchseeder import add_params, bare_session

from actors.messages.session import DownloadFinished
from tests.sessions import Library, running_session
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

MiB = 1024 * 1024
BLOCK = 16 * 1024
GOAL = 0.95  # median of raw time / dlkeeper time at least this
TASK_ID = "bench-throughput"

# The seeder's peer_connect_alert times the start of each download.
_SEEDER_SETTINGS: dict[str, str | int | bool] = {
    "alert_mask": int(lt.alert.category_t.connect_notification),
    "alert_queue_size": 100_000,
}


@dataclass(frozen=True)
class Download:
    seconds: float  # add call to finished event
    start: float  # add call to the seeder's peer_connect_alert (nan if not seen)
    bad_blocks: int  # 16 KiB blocks of the payload that differ on disk (0: intact)
    add_call: float = 0.0  # dlkeeper: the add call itself (persist + start), part of `seconds`

    @property
    def intact(self) -> bool:
        return self.bad_blocks == 0


@dataclass(frozen=True)
class Run:
    number: int
    dlkeeper_first: bool
    dlkeeper: Download
    raw: Download

    @property
    def ratio(self) -> float:
        return self.raw.seconds / self.dlkeeper.seconds


# --- the two downloaders -------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    seconds: float
    added_at: float  # time.time() at the add call, to compare with the seeder's alert timestamps
    add_call: float = 0.0


async def download_with_dlkeeper(
    library: Library, payload: Payload, peer: str, deadline: float
) -> Timing:
    async with running_session(library) as running:
        record = library.record(TASK_ID, payload, peers=(peer,))
        added_at = time.time()
        started = time.perf_counter()
        await running.add(record)
        add_call = time.perf_counter() - started
        await running.next_event(
            DownloadFinished, lambda event: event.task_id == TASK_ID, timeout=deadline
        )
        seconds = time.perf_counter() - started
    return Timing(seconds, added_at, add_call)


def run_dlkeeper(root: Path, payload: Payload, seeder: Seeder, deadline: float) -> Download:
    library = Library(root)
    seeder.session.pop_alerts()
    timing = anyio.run(
        download_with_dlkeeper, library, payload, seeder.peer, deadline, backend="asyncio"
    )
    start = first_connection(seeder, payload) - timing.added_at
    return Download(timing.seconds, start, bad_blocks(library, payload), timing.add_call)


def run_raw(root: Path, payload: Payload, seeder: Seeder, deadline: float) -> Download:
    library = Library(root)  # only for its download folder, which it makes
    session = bare_session()
    try:
        params = add_params(payload, library.download_dir, seeder)
        seeder.session.pop_alerts()
        added_at = time.time()
        started = time.perf_counter()
        session.async_add_torrent(params)
        seconds = _wait_finished(session, started, deadline)
    finally:
        del session  # its destructor waits for libtorrent's shutdown (and its writes)
    start = first_connection(seeder, payload) - added_at
    return Download(seconds, start, bad_blocks(library, payload))


def _wait_finished(session: Any, started: float, deadline: float) -> float:
    while True:
        if time.perf_counter() - started > deadline:
            raise TimeoutError(f"the bare libtorrent download did not finish in {deadline:g} s")
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.torrent_finished_alert):
                return time.perf_counter() - started
            failure = _failure(alert)
            if failure is not None:
                raise RuntimeError(f"the bare libtorrent download failed: {failure}")


def _failure(alert: Any) -> str | None:
    if isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
        return str(alert.message())
    if isinstance(alert, lt.add_torrent_alert) and alert.error.value():
        return str(alert.error.message())
    return None


def first_connection(seeder: Seeder, payload: Payload) -> float:
    """The time (as time.time()) the seeder first saw a peer of `payload`; nan if it did not."""
    for alert in seeder.session.pop_alerts():
        if isinstance(alert, lt.peer_connect_alert) and alert.handle.is_valid():
            hashes = alert.handle.info_hashes()
            if str(hashes.v1) == payload.info_hash:
                return float(alert.timestamp().timestamp())
    return math.nan


def bad_blocks(library: Library, payload: Payload) -> int:
    """The number of 16 KiB blocks of the payload that are wrong or missing in `library`."""
    bad = 0
    for relative, expected in payload.file_hashes.items():
        original = payload.root / relative
        copy = library.download_dir / relative
        if copy.is_file() and _sha256(copy) == expected:
            continue
        blocks = -(-original.stat().st_size // BLOCK)
        if not copy.is_file():
            bad += blocks
            continue
        with original.open("rb") as want, copy.open("rb") as have:
            bad += sum(1 for _ in range(blocks) if want.read(BLOCK) != have.read(BLOCK))
    return bad


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in _chunks(file):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(file: Any) -> Iterator[bytes]:
    while chunk := file.read(4 * MiB):
        yield chunk


def one_run(number: int, directory: Path, payload: Payload, seeder: Seeder, deadline: float) -> Run:
    dlkeeper_first = number % 2 == 0
    run_dir = directory / f"run-{number}"
    try:
        results: dict[str, Download] = {}
        for kind in ("dlkeeper", "raw") if dlkeeper_first else ("raw", "dlkeeper"):
            root = run_dir / kind
            if kind == "dlkeeper":
                results[kind] = run_dlkeeper(root, payload, seeder, deadline)
            else:
                results[kind] = run_raw(root, payload, seeder, deadline)
            shutil.rmtree(root, ignore_errors=True)
            os.sync()  # no writeback of this download during the next one
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return Run(number, dlkeeper_first, results["dlkeeper"], results["raw"])


# --- machine facts and output --------------------------------------------------------------------


def rate(size: int, seconds: float) -> float:
    return size / MiB / seconds


def print_header(
    directory: Path, payload: Payload, size: int, made: float, warm_up: Download
) -> None:
    info = lt.torrent_info(payload.torrent)
    files = info.layout()
    listing = ", ".join(
        f"{files.file_path(index)} {files.file_size(index) / MiB:g} MiB"
        for index in range(files.num_files())
    )
    print("dlkeeper download throughput benchmark")
    print_platform(lt.__version__)
    print(f"  cores        {cores()}")
    print(f"  directory    {directory}")
    print(f"  filesystem   {filesystem_of(directory)}")
    print(f"  payload      {size / MiB:g} MiB in {files.num_files()} files: {listing}")
    print(
        f"  torrent      {info.num_pieces()} pieces of {info.piece_length() // 1024} KiB, "
        f"made and seeded in {made:.1f} s"
    )
    print("  seeder       one loopback libtorrent session in this process, LOOPBACK_SETTINGS")
    print(
        f"  warm-up      one bare download first, not counted: {warm_up.seconds:.3f} s "
        f"({'intact' if warm_up.intact else 'NOT intact'})"
    )
    print()


def _side(download: Download, size: int) -> str:
    transfer = download.seconds - download.start
    return (
        f"{download.seconds:7.3f} s  {rate(size, download.seconds):6.1f}  "
        f"{download.start:6.3f} s  {rate(size, transfer):6.1f}"
    )


def _intact(run: Run, size: int) -> str:
    problems = [
        f"{kind} {download.bad_blocks} of {-(-size // BLOCK)} blocks bad"
        for kind, download in (("dlkeeper", run.dlkeeper), ("raw", run.raw))
        if not download.intact
    ]
    return "yes" if not problems else "NO: " + ", ".join(problems)


def print_runs(runs: list[Run], size: int) -> None:
    columns = f"{'add->done':>9}  {'MiB/s':>6}  {'start':>8}  {'xfer/s':>6}"
    print("add call -> finished event, fresh downloader and folder each time (MiB/s)")
    print(f"  {'':>3}  {'':<8}  {'dlkeeper':<36}  raw")
    print(f"  {'run':>3}  {'first':<8}  {columns}  {columns}  {'raw/dlkeeper':>12}  intact")
    for run in runs:
        print(
            f"  {run.number + 1:>3}  {'dlkeeper' if run.dlkeeper_first else 'raw':<8}  "
            f"{_side(run.dlkeeper, size)}  {_side(run.raw, size)}  {run.ratio:>11.3f}x  "
            f"{_intact(run, size)}"
        )
    print()
    for label, downloads in (
        ("dlkeeper", [run.dlkeeper for run in runs]),
        ("raw", [run.raw for run in runs]),
    ):
        seconds = statistics.median(download.seconds for download in downloads)
        transfer = statistics.median(download.seconds - download.start for download in downloads)
        print(
            f"  median {label:<8}  add->done {seconds:6.3f} s {rate(size, seconds):7.1f} MiB/s"
            f"   start->done {transfer:6.3f} s {rate(size, transfer):7.1f} MiB/s"
        )
    add_call = statistics.median(run.dlkeeper.add_call for run in runs)
    print(f"  dlkeeper's add call (persist + start), median: {add_call * 1000:.1f} ms")
    print()


def print_goal(runs: list[Run]) -> None:
    ratio = statistics.median(run.ratio for run in runs)
    transfer = statistics.median(
        (run.raw.seconds - run.raw.start) / (run.dlkeeper.seconds - run.dlkeeper.start)
        for run in runs
    )
    intact = all(run.dlkeeper.intact and run.raw.intact for run in runs)
    print("goals")
    print(
        f"  {'dlkeeper >= ' + format(GOAL, 'g') + 'x raw throughput (median of raw/dlkeeper)':<58}"
        f"{ratio:6.3f}x   {verdict(ratio >= GOAL)}"
    )
    of_medians = statistics.median(run.raw.seconds for run in runs) / statistics.median(
        run.dlkeeper.seconds for run in runs
    )
    spread = sorted(run.ratio for run in runs)
    print(
        f"    (per run {spread[0]:.3f}x to {spread[-1]:.3f}x; ratio of the medians "
        f"{of_medians:.3f}x; from the first connection on {transfer:.3f}x)"
    )
    print(f"  {'every download intact':<58}{'':7}   {verdict(intact)}")


# --- main ----------------------------------------------------------------------------------------


def benchmark(directory: Path, runs: int, size_mib: int) -> None:
    size = size_mib * MiB
    began = time.perf_counter()
    first = size * 5 // 8
    payload = make_payload(
        directory / "seed", "Bench", {"feature.mkv": first, "extras/bonus.mkv": size - first}
    )
    os.sync()
    deadline = max(120.0, size_mib / 2)  # also on a slow disk: at least 2 MiB/s
    with seeding(payload) as seeder:
        seeder.session.apply_settings(_SEEDER_SETTINGS)
        made = time.perf_counter() - began
        # The first download from a new seeder is the slowest whoever makes it: not counted.
        warm_up = run_raw(directory / "warm-up", payload, seeder, deadline)
        shutil.rmtree(directory / "warm-up", ignore_errors=True)
        os.sync()
        results = [one_run(number, directory, payload, seeder, deadline) for number in range(runs)]
    print_header(directory, payload, size, made, warm_up)
    print_runs(results, size)
    print_goal(results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download throughput through dlkeeper's session actor, as a share of a bare "
        "libtorrent session's, from the same loopback seeder."
    )
    parser.add_argument(
        "--runs", type=int, default=4, help="runs, each downloading with both (default: 4)"
    )
    parser.add_argument(
        "--size-mib", type=int, default=256, help="payload size in MiB (default: %(default)s)"
    )
    add_dir_argument(parser, f"{DIR_HELP} (default: the system's temporary folder)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.size_mib < 2:
        parser.error("--size-mib must be at least 2")
    check_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_work_dir(args.dir, lambda directory: benchmark(directory, args.runs, args.size_mib))


if __name__ == "__main__":
    sys.exit(main())
