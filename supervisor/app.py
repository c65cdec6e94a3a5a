"""The daemon: one root task group, the boot order, signals and exit codes."""

from __future__ import annotations

import logging
import math
import signal

import anyio

from actors.monitor import MonitorActor
from actors.persistence import Persistence, PersistenceActor
from actors.session import Session, SessionActor, SessionOptions
from actors.state import MigrationContext
from actors.statefile import StateStore
from supervisor.config import Config
from supervisor.mailbox import actor_group
from supervisor.messages import SessionEvent

log = logging.getLogger(__name__)

# Exit statuses of `dlkeeper serve` (CONTRACT section 1).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 3

# Spawning the worker and replaying 1,000 downloads takes about a second; a slow SD card more.
SESSION_START_TIMEOUT = 120.0


async def run_daemon(config: Config) -> None:
    """Boots dlkeeper in its fixed order, runs until SIGTERM or SIGINT, then stops in reverse.

    Raises `StateLocked` when another daemon holds the library (the caller exits 3) and
    `ConfigError` for a [libtorrent] setting libtorrent does not know (exit 2).
    """
    # Installed first, so that a SIGTERM at any moment after the ready log is a clean stop.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with actor_group(stop_timeout=config.shutdown_timeout + 10) as actors:
            # 1. The config is loaded and valid (the caller did that, exit 2 otherwise).
            # 2. Take the state lock and load downloads.json: quarantine, backup, migration.
            store = StateStore(
                config.state_dir, MigrationContext(download_path=config.download_path)
            )
            persistence = Persistence(await actors.start(PersistenceActor(store)))
            # 3. Start the libtorrent worker and replay every queued, downloading and paused
            #    download into it. What libtorrent reports meanwhile waits in `events`.
            config.torrents_dir.mkdir(parents=True, exist_ok=True)
            publish, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
            session_actor = SessionActor(session_options(config), persistence, publish)
            session = Session(await actors.start(session_actor))
            await session.wait_replayed(timeout=SESSION_START_TIMEOUT)
            # 4. Only now handle completions (the ones reported during the replay first).
            await actors.start(MonitorActor(persistence, events))
            # 5. The socket and READY=1 join here with the message API.
            stats = await session.stats()
            log.info(
                "dlkeeper running: %d downloads resumed, %d could not be, state in %s",
                stats.resumed_at_start,
                stats.resume_failures,
                store.path,
            )
            async for received in signals:
                log.info("received %s", signal.Signals(received).name)
                break
            log.info("stopping")
    log.info("stopped cleanly")


def session_options(config: Config) -> SessionOptions:
    """The session actor's options from the daemon's config."""
    return SessionOptions(
        torrents_dir=config.torrents_dir,
        libtorrent=dict(config.libtorrent),
        resume_save_interval=config.resume_save_interval,
        shutdown_timeout=config.shutdown_timeout,
    )
