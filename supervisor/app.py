"""The daemon: one root task group, the boot order, signals and exit codes."""

from __future__ import annotations

import logging
import signal

import anyio

from actors.persistence import Persistence, PersistenceActor
from actors.state import MigrationContext
from actors.statefile import StateStore
from supervisor.config import Config
from supervisor.mailbox import actor_group

log = logging.getLogger(__name__)

# Exit statuses of `dlkeeper serve` (CONTRACT section 1).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 3


async def run_daemon(config: Config) -> None:
    """Boots dlkeeper in its fixed order, runs until SIGTERM or SIGINT, then stops in reverse.

    Raises `StateLocked` when another daemon holds the library (the caller exits 3).
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
            loaded = await persistence.snapshot()
            # 3. and 4. (the libtorrent worker with the replay of every active download, then the
            # monitor's completion handling, the socket and READY=1) join here in the next issues.
            log.info("dlkeeper running: %d downloads in %s", len(loaded), store.path)
            async for received in signals:
                log.info("received %s", signal.Signals(received).name)
                break
            log.info("stopping")
    log.info("stopped cleanly")
