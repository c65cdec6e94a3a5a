"""The daemon: one root task group, the boot order, signals and exit codes."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import AsyncIterator

import anyio

from actors.bus import EventBus
from actors.errors import DlkeeperError
from actors.mailbox import actor_group
from actors.messages.session import SessionEvent
from actors.monitor import MonitorActor
from actors.persistence import Persistence, PersistenceActor
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
            async with actor_group(stop_timeout=config.shutdown_timeout + 10) as actors:
                # 1. The config is loaded and valid (the caller did that, exit 2 otherwise).
                # 2. Take the state lock and load downloads.json: quarantine, backup, migration.
                store = StateStore(
                    config.layout.state_dir, MigrationContext(download_path=config.download_path)
                )
                persistence = Persistence(await actors.start(PersistenceActor(store)))
                # Another daemon (of another library) answering on our socket path: said now,
                # not after a replay that would start this library's downloads for nothing.
                await check_socket_free(config.socket)
                # 3. Start the libtorrent worker and replay every queued, downloading and
                #    paused download into it. What libtorrent reports meanwhile waits in `events`.
                try:
                    config.layout.torrents_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise DlkeeperError(f"cannot use download_path: {exc}") from None
                publish, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
                options = session_options(config)
                session_actor = SessionActor(options, persistence, publish)
                session = Session(await actors.start(session_actor))
                await session.wait_replayed(timeout=SESSION_START_TIMEOUT)
                # 4. Only now handle completions (the ones reported during the replay first).
                bus = EventBus()
                await actors.start(MonitorActor(persistence, events, bus))
                # 5. Open the socket, then tell systemd we are ready.
                service = ApiService(config, persistence, session, bus)
                server = ApiServer(service)
                async with anyio.create_task_group() as serving:
                    await serving.start(server.serve, config.socket)
                    systemd.notify("READY=1")
                    serving.start_soon(_pet_watchdog, session, healthy_heartbeat_age(options))
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
                    received = await _first(signals)
                    log.info("received %s: stopping", received.name)
                    systemd.notify("STOPPING=1")
                    daemon.start_soon(_exit_on_second_signal, signals)
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
    log.info("stopped cleanly")


async def _first(signals: AsyncIterator[int]) -> signal.Signals:
    async for received in signals:
        return signal.Signals(received)
    raise RuntimeError("the signal receiver ended")  # pragma: no cover - it never does


async def _exit_on_second_signal(signals: AsyncIterator[int]) -> None:
    received = await _first(signals)
    # Every file dlkeeper writes is replaced atomically, so leaving now corrupts nothing; the
    # worker sees its stdin close and exits too.
    log.warning("received %s while stopping: exiting at once", received.name)
    os._exit(exits.TERMINATED)


async def _pet_watchdog(session: Session, healthy_age: float) -> None:
    """WATCHDOG=1 every half $WATCHDOG_USEC, only while healthy: this loop turning is the event
    loop turning, and the worker must have answered a heartbeat recently."""
    interval = systemd.watchdog_interval()
    if interval is None:
        return
    healthy = True
    while True:
        with anyio.move_on_after(interval):
            stats = await session.stats()
            now_healthy = stats.heartbeat_age is not None and stats.heartbeat_age < healthy_age
            if now_healthy:
                systemd.notify("WATCHDOG=1")
            if now_healthy != healthy:  # said once a change, not at every interval
                if now_healthy:
                    log.info("the libtorrent worker answers again: petting the watchdog")
                else:
                    log.warning("not petting the watchdog: the libtorrent worker is not answering")
                healthy = now_healthy
        await anyio.sleep(interval)


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
    )
