"""The bot's client against a real daemon: the whole cycle, and a daemon restart under it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.client import (
    ApiEvent,
    DaemonUnavailable,
    DlkeeperClient,
    DownloadAddedEvent,
    DownloadCompletedEvent,
    Duplicate,
    NotFound,
)
from tests.daemons import Daemon, running_daemon, write_config
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


@pytest.fixture
def payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "seed", "Film", {"film.mkv": 2_000_000, "film.srt": 3_000})


@pytest.fixture
def seeder(payload: Payload) -> Iterator[Seeder]:
    with seeding(payload) as running:
        yield running


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "etc", tmp_path / "library")


async def test_a_bot_adds_hears_the_completion_imports_and_acks(
    config: Path, tmp_path: Path, payload: Payload, seeder: Seeder
) -> None:
    with running_daemon(config) as daemon:
        async with DlkeeperClient(daemon.socket, connect_timeout=5) as client:
            await client.subscribe()
            added = await client.add(
                magnet=seeder.magnet(payload),
                task_id="film-1",
                torrent_metadata={"tmdb": 7},
            )
            assert added.task_id == "film-1"
            with pytest.raises(Duplicate) as caught:
                await client.add(magnet=seeder.magnet(payload), task_id="film-2")
            assert caught.value.task_id == "film-1"
            completed: DownloadCompletedEvent | None = None
            with anyio.fail_after(30):
                async for event in client.events():
                    if isinstance(event, DownloadCompletedEvent):
                        completed = event
                        break
            assert completed is not None
            event = completed
            assert event.task_id == "film-1"
            assert event.torrent_metadata == {"tmdb": 7}
            for file in event.files:  # "import": every file is whole
                data = (Path(event.save_path) / file.path).read_bytes()
                assert hashlib.sha256(data).hexdigest() == payload.file_hashes[file.path]
            await client.ack("film-1")
            with pytest.raises(NotFound):
                await client.get("film-1")
            assert (await client.stats()).downloads == {}


async def next_added(events: AsyncIterator[ApiEvent]) -> DownloadAddedEvent:
    with anyio.fail_after(20):
        async for event in events:
            if isinstance(event, DownloadAddedEvent):
                return event
    raise AssertionError("the events ended")


async def test_the_events_go_on_across_a_daemon_restart(config: Path) -> None:
    first = Daemon(config)
    try:
        first.wait_ready()
        async with DlkeeperClient(first.socket, connect_timeout=20) as client:
            await client.subscribe()
            events = client.events()  # one iterator, before and after the restart
            await client.add(
                magnet="magnet:?xt=urn:btih:" + "4b" * 20, task_id="before", paused=True
            )
            assert (await next_added(events)).task_id == "before"
            first.stop()
            with pytest.raises(DaemonUnavailable):
                await client.ping()  # no daemon for a moment: a clear error, no hang
            with running_daemon(config) as second:
                # The client reconnects and renews its subscription by itself.
                magnet = "magnet:?xt=urn:btih:" + "5a" * 20
                await client.add(magnet=magnet, task_id="after", paused=True)
                assert (await next_added(events)).task_id == "after"
                assert second.process.poll() is None
    finally:
        first.close()
