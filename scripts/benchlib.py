"""What the hand-run benchmarks in this folder share: machine facts, statistics, output
helpers, /proc readers and the work folder. It never imports libtorrent (bench_replay.py
measures its own process as one that has not loaded it); benchseeder.py holds what needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# --- machine facts -------------------------------------------------------------------------------


def filesystem_of(directory: Path) -> str:
    """`type on device, mounted at point (options)` from /proc/mounts, else what statvfs knows."""
    path = directory.resolve()
    mount_point = path
    while not os.path.ismount(mount_point) and mount_point != mount_point.parent:
        mount_point = mount_point.parent
    found: str | None = None
    try:
        with Path("/proc/mounts").open() as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 4 and fields[1] == str(mount_point):
                    found = f"{fields[2]} on {fields[0]}, mounted at {fields[1]} ({fields[3]})"
    except OSError:
        pass
    info = os.statvfs(path)
    free = info.f_bavail * info.f_frsize / 1e9
    blocks = f"block size {info.f_bsize} B, {free:,.1f} GB free"
    return f"{found}; {blocks}" if found else f"unknown type, mounted at {mount_point}; {blocks}"


def cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return str(total)
    return f"{total} ({usable} usable by this process)"


def print_platform(libtorrent: str | None = None) -> None:
    """The python, (libtorrent,) system lines of a benchmark's header."""
    print(f"  python       {platform.python_version()} ({platform.python_implementation()})")
    if libtorrent is not None:
        print(f"  libtorrent   {libtorrent}")
    print(f"  system       {platform.system()} {platform.release()} {platform.machine()}")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


# --- /proc readers and process timing ------------------------------------------------------------


def cpu_of(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds a process (or one of its threads) has used, from
    /proc/<pid>/stat (or /proc/<pid>/task/<thread>/stat); 0 once gone."""
    path = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    try:
        stat = path.read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (/proc/<pid>/status) and Pss
    (/proc/<pid>/smaps_rollup) of a process, in KiB; empty when it is gone."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                found[key] = int(value.split()[0])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                found[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return found


def timed_run(
    command: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = False,
) -> tuple[float, bytes]:
    """The seconds from spawn to exit of a command that must exit 0, and its stdout when
    `capture` (else b"")."""
    began = time.perf_counter()
    # No timeout: with one, subprocess polls the child with sleeps of up to 50 ms.
    completed = subprocess.run(
        command, check=True, stdin=subprocess.DEVNULL, env=env, cwd=cwd, capture_output=capture
    )
    return time.perf_counter() - began, completed.stdout or b""


def time_command(
    command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> float:
    return timed_run(command, env, cwd)[0]


# --- statistics and output -----------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN when there are no values)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = round(fraction * (len(ordered) - 1))
    return ordered[min(len(ordered) - 1, max(0, rank))]


def seen(values: Iterable[float]) -> list[float]:
    """The values that are not NaN (a NaN sample is one that was not seen)."""
    return [value for value in values if not math.isnan(value)]


def worst(values: Iterable[float]) -> float:
    """The largest value seen (NaN when none was)."""
    return max(seen(values), default=math.nan)


def ms(seconds: float, places: int = 1) -> str:
    return f"{seconds * 1000:8.{places}f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:7.1f} MiB"


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


@dataclass(frozen=True)
class Distribution:
    """Rows of `label  median  p90  max  min`, labels `width` wide, in ms with `places`
    decimals; NaN values are counted as not seen."""

    width: int
    places: int = 1

    def header(self) -> str:
        return f"  {'':<{self.width}} {'median':>11}  {'p90':>11}  {'max':>11}  {'min':>11}"

    def row(self, label: str, values: list[float]) -> str:
        valid = seen(values)
        missing = len(values) - len(valid)
        if not valid:
            return f"  {label:<{self.width}} no samples"
        cells = (statistics.median(valid), percentile(valid, 0.9), max(valid), min(valid))
        return (
            f"  {label:<{self.width}} "
            + "  ".join(ms(cell, self.places) for cell in cells)
            + (f"   ({missing} not seen)" if missing else "")
        )


# --- the command line and the work folder --------------------------------------------------------

DIR_HELP = "work in a temporary folder made inside DIR and removed at the end"


def add_dir_argument(parser: argparse.ArgumentParser, help: str = DIR_HELP) -> None:
    parser.add_argument("--dir", type=Path, default=None, metavar="DIR", help=help)


def check_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a folder")


def in_work_dir(parent: Path | None, action: Callable[[Path], object]) -> int:
    """Runs `action` on a temporary folder made inside `parent`, removed at the end; 0."""
    directory = Path(tempfile.mkdtemp(prefix="dlkeeper-bench-", dir=parent))
    try:
        action(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0
