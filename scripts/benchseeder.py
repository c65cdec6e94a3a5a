"""The seeder's side of a loopback download, shared by bench_latency.py and bench_daemon.py:
the calibrated last-HAVE latency measurement, and a bare session's finish."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import anyio
import libtorrent as lt

from tests.swarm import Seeder


def seeder_settings() -> dict[str, str | int | bool]:
    """For the seeder: its peer log, uploads and connections, in a large alert queue."""
    return {
        "alert_mask": int(
            lt.alert.category_t.peer_log_notification
            | lt.alert.category_t.upload_notification
            | lt.alert.category_t.connect_notification
        ),
        "alert_queue_size": 1_000_000,
    }


def raw_alert_mask() -> int:
    """The alerts a bare downloading session needs: errors, status, storage."""
    return int(
        lt.alert.category_t.error_notification
        | lt.alert.category_t.status_notification
        | lt.alert.category_t.storage_notification
    )


@dataclass
class SeederView:
    """What the seeder saw of one download: the last HAVE in, the last block out, the end."""

    last_have: float = math.nan
    last_block: float = math.nan
    disconnected: float = math.nan


@dataclass(frozen=True)
class Sample:
    received: float  # time.time() when the completion reached Python
    seeder: SeederView
    finished: float = math.nan  # bare session only: its torrent_finished_alert timestamp

    @property
    def latency(self) -> float:
        return self.received - self.seeder.last_have

    @property
    def bound(self) -> float:
        return self.received - self.seeder.last_block


def _info_hash(alert: Any) -> str | None:
    handle = getattr(alert, "handle", None)
    if handle is None or not handle.is_valid():
        return None
    return str(handle.info_hashes().v1)


def collect(seeder: Seeder, view: SeederView, info_hash: str) -> None:
    """Folds the seeder's queued alerts about `info_hash` into `view`."""
    for alert in seeder.session.pop_alerts():
        if _info_hash(alert) != info_hash:
            continue
        stamp = float(alert.timestamp().timestamp())
        if isinstance(alert, lt.peer_log_alert) and "<== HAVE " in alert.message():
            view.last_have = stamp
        elif isinstance(alert, lt.block_uploaded_alert):
            view.last_block = stamp
        elif isinstance(alert, lt.peer_disconnected_alert):
            view.disconnected = stamp


async def seeder_view(seeder: Seeder, info_hash: str) -> SeederView:
    """The seeder's view once it has dropped the (now seeding) downloader, or after 2 s."""
    view = SeederView()
    with anyio.move_on_after(2.0):
        while True:
            collect(seeder, view, info_hash)
            if not math.isnan(view.disconnected):
                break
            await anyio.sleep(0.01)
    return view


def wait_finished(session: Any, limit: float) -> tuple[float, float]:
    """(the torrent_finished_alert's timestamp, time.time() when Python popped it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.torrent_finished_alert):
                return float(alert.timestamp().timestamp()), time.time()
    raise TimeoutError(f"the bare libtorrent download did not finish in {limit:g} s")
