"""A real test swarm: a libtorrent seeder on 127.0.0.1 with a generated payload.

DHT, LSD, UPnP, NAT-PMP and uTP are off (uTP on loopback is about ten times slower than TCP).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import libtorrent as lt

from supervisor.loopback import LOOPBACK_SETTINGS
from tests.torrents import Payload

# The demo's loopback-only settings also go into the daemon's [libtorrent] table in tests.
__all__ = ["LOOPBACK_SETTINGS", "Seeder", "seeding"]


class Seeder:
    """A seeding libtorrent session; `peer` is the `host:port` to give a downloader."""

    def __init__(self, session: Any, handles: dict[str, Any]) -> None:
        self.session = session
        self.handles = handles

    @property
    def port(self) -> int:
        return int(self.session.listen_port())

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.port}"

    def magnet(self, payload: Payload) -> str:
        """A tracker-less magnet for `payload` that names this seeder (`x.pe`)."""
        v2 = len(payload.info_hash) == 64
        topic = f"urn:btmh:1220{payload.info_hash}" if v2 else f"urn:btih:{payload.info_hash}"
        return f"magnet:?xt={topic}&dn={payload.name}&x.pe={self.peer}"


def _wait_seeding(session: Any, handle: Any, deadline: float) -> None:
    while not handle.status().is_seeding:
        if time.monotonic() > deadline:
            raise TimeoutError(f"seeder did not verify {handle.status().name} in time")
        session.wait_for_alert(100)
        session.pop_alerts()


@contextmanager
def seeding(*payloads: Payload, upload_rate_limit: int = 0) -> Iterator[Seeder]:
    """Seeds every payload from one session on 127.0.0.1 until the block ends.

    `upload_rate_limit` (bytes/s, 0 = none) slows the seeder so a test can act mid-download.
    """
    session = lt.session(cast("lt.settings_pack", LOOPBACK_SETTINGS))
    if upload_rate_limit:
        # Loopback peers are in libtorrent's "local" class, which rate limits do not touch.
        local = session.get_peer_class(session.local_peer_class_id)
        session.set_peer_class(
            session.local_peer_class_id, {**local, "upload_limit": upload_rate_limit}
        )
    handles: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    for payload in payloads:
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(payload.torrent)
        params.save_path = str(payload.root)
        params.flags |= lt.torrent_flags.seed_mode  # the files are ours: skip the hash check
        handles[payload.info_hash] = session.add_torrent(params)
    for handle in handles.values():
        _wait_seeding(session, handle, deadline)
        # Out of libtorrent's queue, which would keep it paused until its first tick: a
        # paused seeder refuses a peer, and that peer waits a minute before it tries again.
        handle.unset_flags(lt.torrent_flags.auto_managed)
        handle.resume()
    for handle in handles.values():
        while handle.status().paused:
            if time.monotonic() > deadline:
                raise TimeoutError("seeder did not start seeding in time")
            session.wait_for_alert(100)
            session.pop_alerts()
    try:
        yield Seeder(session, handles)
    finally:
        for handle in handles.values():
            session.remove_torrent(handle)
        del session
