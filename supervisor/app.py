"""The daemon: one root task group, the boot order, signals and exit codes."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from actors.bus import EventBus
from actors.errors import DlkeeperError, StorageMissing
from actors.layout import Layout
from actors.mailbox import actor_group
from actors.messages.session import SessionEvent
from actors.monitor import MonitorActor
from actors.persistence import Persistence, PersistenceActor
from actors.problems import Problems
from actors.session import Session, SessionActor, SessionOptions
from actors.state import MigrationContext
from actors.statefile import StateStore
from supervisor import exits, systemd
from supervisor.api import ApiService
from supervisor.config import Config
from supervisor.server import ApiServer, check_socket_free

log = logging.getLogger(__name__)

# Spawning the worker and replaying 1,000 downloads takes about a second; a slow SD card more.
SESSION_START_TIMEOUT = 120.0


async def run_daemon(config: Config) -> None:
    """Boots dlkeeper in its fixed order, serves until SIGTERM or SIGINT, then stops in reverse.

    Raises `StateLocked` when another daemon holds the library (the caller exits 3) and
    `ConfigError` for a bad [libtorrent] setting or socket path (exit 2).
    """
    # Installed first, so that a SIGTERM at any moment is a clean stop.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as daemon:
            stop = _StopRequest()
            daemon.start_soon(_watch_signals, signals, stop)
            async with actor_group(stop_timeout=config.shutdown_timeout + 10) as actors:
                # 1. The config is loaded and valid (the caller did that, exit 2 otherwise), and
                #    its storage is there: a drive not mounted is said, never papered over.
                missing = config.layout.missing_storage()
                if missing is not None:
                    raise missing
                problems = Problems()
                # 2. Take the state lock and load downloads.json: quarantine, backup, migration.
                store = StateStore(
                    config.layout.state_dir, MigrationContext(download_path=config.download_path)
                )
                persistence = Persistence(await actors.start(PersistenceActor(store, problems)))
                # Another daemon (of another library) answering on our socket path: said now,
                # not after a replay that would start this library's downloads for nothing.
                await check_socket_free(config.socket)
                # 3. Start the libtorrent worker and replay every queued, downloading and
                #    paused download into it. What libtorrent reports meanwhile waits in `events`.
                await _make_torrents_dir(config.layout, persistence)
                # A drive unmounted under the running daemon stops it (exit 4, as at start):
                # its downloads must not turn failed for files that are merely not there.
                devices = await anyio.to_thread.run_sync(config.layout.storage_devices)
                daemon.start_soon(_watch_storage, config.layout, devices, stop)
                publish, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
                options = session_options(config)
                session_actor = SessionActor(options, persistence, publish, problems)
                session = Session(await actors.start(session_actor))
                # A stop asked for during the replay is carried out now, not after it: leaving
                # the actor group ends the replay (the worker is closed).
                with anyio.CancelScope() as replaying:
                    daemon.start_soon(_cancel_on, stop.requested, replaying)
                    await session.wait_replayed(timeout=SESSION_START_TIMEOUT)
                if replaying.cancelled_caught:
                    log.info("%s during the replay: stopping", stop.said())
                    systemd.notify("STOPPING=1")
                else:
                    # 4. Only now handle completions (the ones reported during the replay first).
                    bus = EventBus()
                    await actors.start(MonitorActor(persistence, events, bus, problems))
                    # 5. Open the socket, then tell systemd we are ready.
                    service = ApiService(config, persistence, session, bus, problems)
                    server = ApiServer(service)
                    async with anyio.create_task_group() as serving:
                        await serving.start(server.serve, config.socket)
                        systemd.notify("READY=1")
                        serving.start_soon(
                            _pet_watchdog, session, persistence, healthy_heartbeat_age(options)
                        )
                        stats = await session.stats()
                        log.info(
                            "dlkeeper running: %d download%s resumed, %d could not be, "
                            "socket %s, state in %s",
                            stats.resumed_at_start,
                            "" if stats.resumed_at_start == 1 else "s",
                            stats.resume_failures,
                            config.socket,
                            store.path,
                        )
                        await stop.requested.wait()
                        log.info("%s: stopping", stop.said())
                        systemd.notify("STOPPING=1")
                        serving.cancel_scope.cancel()  # stop accepting; the socket goes
                    # Resume data for every download now, while the monitor still records the
                    # progress it holds; the session's own save on stop then finds little left.
                    with (
                        anyio.move_on_after(config.shutdown_timeout),
                        contextlib.suppress(DlkeeperError),
                    ):
                        await session.save_resume_data()
                # Leaving the actor group stops the monitor, then the session (which saves
                # resume data, bounded by shutdown_timeout), then persistence (the lock).
            daemon.cancel_scope.cancel()
    if stop.error is not None:
        raise stop.error
    log.info("stopped cleanly")


async def _make_torrents_dir(layout: Layout, persistence: Persistence) -> None:
    """Makes `{download_path}/torrents/` when it is missing, unless the state says downloads
    keep their .torrent there: then the folder found is not the one they were added to (the
    mount point of a drive not mounted, say), and starting on it would lose them."""
    if layout.torrents_dir.is_dir():
        return
    snapshot = await persistence.snapshot()
    kept_there = [
        record
        for record in snapshot.values()
        if record.torrent_file_path is not None
        and Path(record.torrent_file_path).parent == layout.torrents_dir
    ]
    if kept_there:
        raise StorageMissing(
            f"{layout.torrents_dir} does not exist, yet {len(kept_there)} download"
            f"{'' if len(kept_there) == 1 else 's'} keep their .torrent there: is the drive of "
            f"download_path {layout.download_path} mounted?"
        )
    try:
        layout.torrents_dir.mkdir(exist_ok=True)  # download_path itself: never
    except OSError as exc:
        raise DlkeeperError(f"cannot use download_path: {exc}") from None


@dataclass
class _StopRequest:
    """Set by the first SIGTERM or SIGINT, or by storage that went away (`error`)."""

    requested: anyio.Event = field(default_factory=anyio.Event)
    name: str = ""
    error: DlkeeperError | None = None  # raised once the daemon has stopped

    def said(self) -> str:
        return self.name if self.error is not None else f"received {self.name}"


STORAGE_CHECK_INTERVAL = 1.0  # seconds between looks at the library's folders


async def _watch_storage(
    layout: Layout,
    devices: tuple[int, int],
    stop: _StopRequest,
    interval: float = STORAGE_CHECK_INTERVAL,
) -> None:
    """Asks for a stop when library_path or download_path goes away (see
    `Layout.storage_gone`); the daemon then exits 4, and systemd starts it again, which waits
    for the drive as at boot."""
    while not stop.requested.is_set():
        gone = await anyio.to_thread.run_sync(layout.storage_gone, devices)
        if gone is not None:
            log.error("%s: stopping (the downloads stay as they are)", gone)
            stop.name, stop.error = "storage gone", gone
            stop.requested.set()
            return
        await anyio.sleep(interval)


async def _watch_signals(signals: AsyncIterator[int], stop: _StopRequest) -> None:
    """The first signal asks for a clean stop; a second one, while stopping, exits at once."""
    async for received in signals:
        name = signal.Signals(received).name
        if not stop.requested.is_set():
            stop.name = name
            stop.requested.set()
            continue
        # Every file dlkeeper writes is replaced atomically, so leaving now corrupts nothing;
        # the worker sees its stdin close and exits too.
        log.warning("received %s while stopping: exiting at once", name)
        os._exit(exits.TERMINATED)


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _pet_watchdog(session: Session, persistence: Persistence, healthy_age: float) -> None:
    """WATCHDOG=1 every half $WATCHDOG_USEC, only while healthy: this loop turning is the event
    loop turning, the worker must have answered a heartbeat recently, and the persistence actor
    must answer a read (it never waits for a write) within the interval."""
    interval = systemd.watchdog_interval()
    if interval is None:
        return
    said: str | None = None
    while True:
        problem = await _health_problem(session, persistence, healthy_age, interval)
        if problem is None:
            systemd.notify("WATCHDOG=1")
        if problem != said:  # said once a change, not at every interval
            if problem is None:
                log.info("%s answers again: petting the watchdog", _WHO[said or ""])
            else:
                log.warning("not petting the watchdog: %s is not answering", _WHO[problem])
            said = problem
        await anyio.sleep(interval)


_WHO = {
    "worker": "the libtorrent worker",
    "session": "the session actor",
    "persistence": "the persistence actor",
    "": "all",
}


async def _health_problem(
    session: Session, persistence: Persistence, healthy_age: float, within: float
) -> str | None:
    """None when healthy, else which part is not answering (a key of `_WHO`)."""
    with anyio.move_on_after(within):
        stats = await session.stats()
        if stats.heartbeat_age is None or stats.heartbeat_age >= healthy_age:
            return "worker"
        with anyio.move_on_after(within):
            await persistence.stats()
            return None
        return "persistence"
    return "session"


def healthy_heartbeat_age(options: SessionOptions) -> float:
    """How old the worker's last heartbeat may be while it counts as healthy: a ping is due
    every heartbeat_interval, and the session actor replaces a worker that leaves one unanswered
    for heartbeat_timeout, so a hang must show well within their sum."""
    return options.heartbeat_interval + options.heartbeat_timeout / 2


def session_options(config: Config) -> SessionOptions:
    """The session actor's options from the daemon's config."""
    return SessionOptions(
        layout=config.layout,
        libtorrent=dict(config.libtorrent),
        resume_save_interval=config.resume_save_interval,
        shutdown_timeout=config.shutdown_timeout,
        min_free_bytes=config.min_free_bytes,
    )
