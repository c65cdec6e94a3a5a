"""The seeder's side of a loopback download, shared by bench_latency.py and bench_daemon.py:
the calibrated last-HAVE latency measurement, and a bare session's finish (also used by
bench_throughput.py). It imports libtorrent, so bench_replay.py must not import it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import libtorrent as lt

from tests.swarm import LOOPBACK_SETTINGS, Seeder, seeding
from tests.torrents import Payload, make_payload

KiB = 1024


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
    """The alerts a bare downloading session needs: errors, status, storage. What the worker
    asks for (actors.session_worker._ALERT_MASK); a bare session's default mask would not post
    torrent_finished_alert."""
    return int(
        lt.alert.category_t.error_notification
        | lt.alert.category_t.status_notification
        | lt.alert.category_t.storage_notification
    )


def latency_payloads(folder: Path, downloads: int, size: int) -> list[Payload]:
    """`downloads` distinct single-file payloads of `size` bytes (64 KiB pieces up to 4 MiB)."""
    piece = 64 * KiB if size <= 4096 * KiB else 0
    return [
        make_payload(folder, f"Latency{number:03d}", {"a.bin": size}, piece_size=piece)
        for number in range(downloads)
    ]


@contextlib.contextmanager
def seeding_all(payloads: list[Payload]) -> Iterator[Seeder]:
    """A loopback seeder of every payload at once, with the alerts `collect` reads."""
    with seeding(*payloads) as seeder:
        seeder.session.apply_settings(seeder_settings())
        for handle in seeder.handles.values():
            # libtorrent's queue keeps only a few auto-managed seeds active: seed them all.
            handle.unset_flags(lt.torrent_flags.auto_managed)
            handle.resume()
        yield seeder


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


def bare_session() -> Any:
    """A bare libtorrent session with LOOPBACK_SETTINGS and `raw_alert_mask`."""
    settings = {**LOOPBACK_SETTINGS, "alert_mask": raw_alert_mask()}
    return lt.session(cast("lt.settings_pack", settings))


def add_params(payload: Payload, save_path: Path, seeder: Seeder) -> Any:
    """The add_torrent_params of `payload` into `save_path`, the seeder as its only peer."""
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(payload.torrent)
    params.save_path = str(save_path)
    params.peers = [("127.0.0.1", seeder.port)]
    return params


def through_bare_session(
    root: Path, payloads: list[Payload], seeder: Seeder, limit: float
) -> list[Sample]:
    """The calibration: the payloads downloaded one at a time by a bare libtorrent session in
    this process, whose own torrent_finished_alert timestamp is known (each within `limit` s)."""
    session = bare_session()
    samples: list[Sample] = []
    try:
        for payload in payloads:
            params = add_params(payload, root, seeder)
            seeder.session.pop_alerts()
            session.async_add_torrent(params)
            finished, received = wait_finished(session, limit)
            view = anyio.run(seeder_view, seeder, payload.info_hash, backend="asyncio")
            samples.append(Sample(received, view, finished))
    finally:
        del session
    return samples


def wait_finished(session: Any, limit: float) -> tuple[float, float]:
    """(the torrent_finished_alert's timestamp, time.time() when Python popped it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.torrent_finished_alert):
                return float(alert.timestamp().timestamp()), time.time()
    raise TimeoutError(f"the bare libtorrent download did not finish in {limit:g} s")
