"""Running the persistence and session actors against a real loopback swarm, for tests."""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import libtorrent as lt
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.layout import Layout
from actors.mailbox import actor_group
from actors.messages.session import SessionEvent
from actors.messages.worker import TorrentStatus
from actors.monitor import MonitorActor
from actors.persistence import Persistence, PersistenceActor
from actors.session import Session, SessionActor, SessionOptions
from actors.state import DownloadRecord, DownloadStatus, MigrationContext
from actors.statefile import StateStore
from tests.swarm import LOOPBACK_SETTINGS
from tests.torrents import Payload

E = TypeVar("E", bound=SessionEvent)

DEADLINE = 30.0


@dataclass
class Library:
    """A library folder: state in `data/`, payloads in `downloads/`, copies in `torrents/`."""

    root: Path

    def __post_init__(self) -> None:
        # The operator makes these; the daemon never does (CONTRACT.md section 3).
        self.layout.download_path.mkdir(parents=True, exist_ok=True)

    @property
    def layout(self) -> Layout:
        return Layout(library_path=self.root, download_path=self.root / "downloads")

    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    @property
    def download_dir(self) -> Path:
        return self.layout.download_path

    @property
    def torrents_dir(self) -> Path:
        return self.layout.torrents_dir

    def record(
        self,
        task_id: str,
        payload: Payload,
        *,
        magnet: str | None = None,
        status: DownloadStatus = DownloadStatus.DOWNLOADING,
        file_priorities: tuple[int, ...] = (),
        peers: tuple[str, ...] = (),
    ) -> DownloadRecord:
        """A download of `payload`: from a kept .torrent copy, or from `magnet` if given."""
        torrent_path: str | None = None
        if magnet is None:
            self.torrents_dir.mkdir(parents=True, exist_ok=True)
            path = self.torrents_dir / f"{task_id}.torrent"
            path.write_bytes(payload.torrent)
            torrent_path = str(path)
        return DownloadRecord(
            task_id=task_id,
            name=payload.name,
            info_hash=payload.info_hash,
            created_at=datetime.now(UTC),
            status=status,
            magnet_link=magnet,
            torrent_file_path=torrent_path,
            save_path=str(self.download_dir),
            file_priorities=file_priorities,
            peers=peers,
        )

    def hashes_match(self, payload: Payload, only: set[str] | None = None) -> bool:
        """Whether every (or every named) file of `payload` was downloaded intact."""
        for relative, expected in payload.file_hashes.items():
            if only is not None and relative not in only:
                continue
            path = self.download_dir / relative
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
                return False
        return True


@dataclass
class RunningSession:
    persistence: Persistence
    session: Session
    events: MemoryObjectReceiveStream[SessionEvent]
    seen: list[SessionEvent] = field(default_factory=list)

    async def next_event(
        self,
        kind: type[E],
        matching: Callable[[E], bool] = lambda _: True,
        timeout: float = DEADLINE,
    ) -> E:
        """The next published event of `kind` that matches; fails after `timeout` seconds."""
        with anyio.fail_after(timeout):
            async for event in self.events:
                self.seen.append(event)
                if isinstance(event, kind) and matching(event):
                    return event
        raise AssertionError(f"the event stream ended before a {kind.__name__}")

    async def wait_status(
        self,
        task_id: str,
        condition: Callable[[TorrentStatus], bool],
        timeout: float = DEADLINE,
    ) -> TorrentStatus:
        """Polls the download's live status until `condition` holds; fails after `timeout`."""
        with anyio.fail_after(timeout):
            while True:
                (status,) = await self.session.status(task_id)
                if condition(status):
                    return status
                await anyio.sleep(0.05)

    async def wait_record(
        self,
        task_id: str,
        condition: Callable[[DownloadRecord], bool],
        timeout: float = DEADLINE,
    ) -> DownloadRecord:
        """Polls the saved record until `condition` holds; fails after `timeout` seconds."""
        with anyio.fail_after(timeout):
            while True:
                record = await self.persistence.get(task_id)
                if condition(record):
                    return record
                await anyio.sleep(0.05)

    async def add(self, record: DownloadRecord) -> None:
        """Persists the download, then starts it (the order the daemon uses)."""
        await self.persistence.add(record)
        await self.session.add(record)


@asynccontextmanager
async def running_session(
    library: Library, *, monitor: bool = False, **options: Any
) -> AsyncIterator[RunningSession]:
    """The persistence and session actors on `library`, with loopback libtorrent settings.

    With `monitor`, a monitor actor is started after the replay (the daemon's boot order) and
    takes the session's events: the test then sees their effect in the persistence actor.
    """
    settings = {**LOOPBACK_SETTINGS, **options.pop("libtorrent", {})}
    session_options = SessionOptions(layout=library.layout, libtorrent=settings, **options)
    library.torrents_dir.mkdir(parents=True, exist_ok=True)
    publish, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
    store = StateStore(library.state_dir, MigrationContext(download_path=library.download_dir))
    async with actor_group() as group:
        persistence = Persistence(await group.start(PersistenceActor(store)))
        actor = SessionActor(session_options, persistence, publish)
        session = Session(await group.start(actor))
        await session.wait_replayed(timeout=DEADLINE)
        if monitor:
            await group.start(MonitorActor(persistence, events))
        yield RunningSession(persistence, session, events)


def resume_progress(path: Path) -> float:
    """The share of pieces that a .fastresume file says are downloaded (as libtorrent reads it)."""
    params = lt.read_resume_data(path.read_bytes())
    have = params.have_pieces
    # libtorrent pads the bitfield to a multiple of 8: the torrent says how many pieces it has.
    pieces = params.ti.num_pieces() if params.ti is not None else len(have)
    return sum(1 for piece in have if piece) / pieces if pieces else 0.0
