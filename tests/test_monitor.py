"""The monitor: what the session reports is recorded in the state file, durably and in order."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.state import DownloadStatus
from tests.sessions import Library, running_session
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


@pytest.fixture
def library(tmp_path: Path) -> Library:
    return Library(tmp_path / "library")


@pytest.fixture
def payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "seed", "Show", {"e01.mkv": 1_500_000, "e02.mkv": 900_000})


@pytest.fixture
def seeder(payload: Payload) -> Iterator[Seeder]:
    with seeding(payload) as running:
        yield running


async def test_finished_download_is_saved_as_completed(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library, monitor=True) as running:
        await running.add(library.record("c1", payload, peers=(seeder.peer,)))
        record = await running.wait_record("c1", lambda r: r.status is DownloadStatus.COMPLETED)
    assert record.completed_at is not None
    assert record.progress == 1.0
    assert library.hashes_match(payload)


async def test_completion_reported_during_the_replay_is_recorded_once_the_monitor_runs(
    library: Library, payload: Payload
) -> None:
    # The download finished on disk but the daemon died before it could record that: the
    # replay re-adds it, libtorrent finds every piece, and the monitor records the completion.
    async with running_session(library) as running:
        await running.persistence.add(library.record("r1", payload))
    shutil.copytree(payload.root / payload.name, library.download_dir / payload.name)
    async with running_session(library, monitor=True) as running:
        record = await running.wait_record("r1", lambda r: r.status is DownloadStatus.COMPLETED)
    assert record.completed_at is not None


async def test_download_that_cannot_be_replayed_is_saved_as_failed_with_the_reason(
    library: Library, payload: Payload
) -> None:
    record = library.record("gone", payload)
    Path(record.torrent_file_path or "").unlink()
    async with running_session(library) as running:
        await running.persistence.add(record)
    async with running_session(library, monitor=True) as running:
        failed = await running.wait_record("gone", lambda r: r.status is DownloadStatus.FAILED)
    assert failed.error is not None
    assert "gone.torrent" in failed.error


async def test_magnet_download_records_its_kept_torrent(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library, monitor=True) as running:
        await running.add(library.record("m1", payload, magnet=seeder.magnet(payload)))
        record = await running.wait_record("m1", lambda r: r.torrent_file_path is not None)
        assert record.torrent_file_path == str(library.torrents_dir / "m1.torrent")
        assert Path(record.torrent_file_path).read_bytes()
        await running.wait_record("m1", lambda r: r.status is DownloadStatus.COMPLETED)


async def test_progress_is_saved_with_each_resume_save(library: Library, tmp_path: Path) -> None:
    slow = make_payload(tmp_path / "slow", "Slow", {"big.bin": 6 * 1024 * 1024})
    with seeding(slow, upload_rate_limit=1536 * 1024) as seeder:
        async with running_session(library, monitor=True, resume_save_interval=0.3) as running:
            await running.add(library.record("p1", slow, peers=(seeder.peer,)))
            saved = await running.wait_record("p1", lambda r: 0.1 < r.progress < 1.0)
            (live,) = await running.session.status("p1")
    # The saved progress trails the live one by at most about one interval.
    assert saved.status is DownloadStatus.DOWNLOADING
    assert saved.progress <= live.progress


async def test_a_queued_download_is_saved_as_downloading_once_it_starts(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library, monitor=True) as running:
        record = library.record("q1", payload, peers=(seeder.peer,))
        await running.add(record.model_copy(update={"status": DownloadStatus.QUEUED}))
        await running.wait_record("q1", lambda r: r.status is not DownloadStatus.QUEUED)
