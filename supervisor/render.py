"""What the client commands (`supervisor.commands`) and `watch` (`supervisor.watch`) show: the
console they print on, what a table shows of one download, and the formatting of its numbers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console
from rich.text import Text

from supervisor.client import DownloadInfo

PASSING_STATUSES = frozenset({"queued", "checking", "fetching_metadata"})
ACTIVE_STATUSES = PASSING_STATUSES | {"downloading"}
STATUS_STYLES = {
    "downloading": "cyan",
    "completed": "green",
    "failed": "bold red",
    "paused": "yellow",
}


class ReaderGone(Exception):
    """The reader of stdout closed it (a pipe into `head`)."""


class OutputConsole(Console):
    """rich's console, but a closed pipe raises `ReaderGone`."""

    def on_broken_pipe(self) -> None:
        # rich's own raises SystemExit, which a task group then reports as a crash.
        silence_stdout()
        raise ReaderGone


def silence_stdout() -> None:
    """Points stdout at /dev/null, so that nothing is left to flush into a closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@dataclass
class Row:
    """What a table (`ls`, `info`, `watch`) shows of one download."""

    task_id: str
    name: str
    status: str
    progress: float
    total_bytes: int
    download_rate: int
    num_peers: int
    error: str | None

    @classmethod
    def of(cls, info: DownloadInfo) -> Row:
        return cls(
            task_id=info.task_id,
            name=info.name,
            status=info.status,
            progress=info.progress,
            total_bytes=info.total_bytes,
            download_rate=info.download_rate,
            num_peers=info.num_peers,
            error=info.error,
        )

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def seconds_left(self) -> float | None:
        if not self.active or self.download_rate <= 0 or self.total_bytes <= 0:
            return None
        return (1.0 - self.progress) * self.total_bytes / self.download_rate

    def stop(self, status: str) -> None:
        self.status = status
        self.download_rate = 0
        self.num_peers = 0


def status(row: Row) -> Text:
    return Text(row.status, style=STATUS_STYLES.get(row.status, ""))


def percent(progress: float) -> str:
    return f"{progress * 100:.1f}%"


def size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    for unit in units:
        count /= 1024
        if count < 1024 or unit == units[-1]:
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def short_size(count: float) -> str:
    """At most 5 characters: 999B, 1023K, 7.6M, 12G."""
    for unit in ("B", "K", "M", "G", "T"):
        if count < 1000 or unit == "T":
            return f"{count:.1f}{unit}" if unit != "B" and count < 10 else f"{count:.0f}{unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_space(free_bytes: int | None) -> str:
    """The daemon's `free_bytes`: unknown when it could not read them."""
    return "unknown" if free_bytes is None else size(free_bytes)


def rate(per_second: int) -> str:
    return f"{size(per_second)}/s"


def duration(seconds: float) -> str:
    whole = round(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def eta(row: Row) -> str:
    left = row.seconds_left()
    return "-" if left is None else duration(left)


def timestamp(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S %Z")
