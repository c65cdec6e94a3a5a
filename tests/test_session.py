"""The session actor and its worker, against a real libtorrent seeder on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import libtorrent as lt
import pytest

from actors.errors import (
    ActorDied,
    ConfigError,
    NotReady,
    RestartIntensityExceeded,
    first_dlkeeper_error,
)
from actors.messages.persistence import RecordChanges
from actors.messages.session import (
    DownloadErrored,
    DownloadFinished,
    DownloadMetadataKept,
    DownloadStateChanged,
    WorkerRestarted,
)
from actors.messages.worker import TorrentStatus
from actors.metainfo import torrent_info_hash
from actors.state import DownloadStatus, MigrationContext
from actors.statefile import StateStore
from tests.records import make_record
from tests.sessions import DEADLINE, Library, resume_progress, running_session
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

MiB = 1024 * 1024
SLOW_RATE = 3 * MiB // 2


@pytest.fixture
def library(tmp_path: Path) -> Library:
    return Library(tmp_path / "library")


@pytest.fixture
def payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "seed", "Movie", {"movie.mkv": 3 * MiB, "extras/a.srt": 40_000})


@pytest.fixture
def seeder(payload: Payload) -> Iterator[Seeder]:
    with seeding(payload) as running:
        yield running


@pytest.fixture
def slow_payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "slow", "Slow", {"big.bin": 8 * MiB}, piece_size=64 * 1024)


@pytest.fixture
def slow_seeder(slow_payload: Payload) -> Iterator[Seeder]:
    # 8 MiB at 1.5 MiB/s: about five seconds, time enough to act part-way.
    with seeding(slow_payload, upload_rate_limit=SLOW_RATE) as running:
        yield running


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_download_by_torrent_completes_with_intact_files(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library) as running:
        await running.add(library.record("t1", payload, peers=(seeder.peer,)))
        await running.next_event(DownloadFinished, lambda e: e.task_id == "t1")
        # Finished means on disk: libtorrent hashes blocks before writing them, so the event
        # waits for a flush (a bot imports the files as soon as it hears).
        assert library.hashes_match(payload)


async def test_download_by_magnet_keeps_the_torrent_once_metadata_arrives(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library) as running:
        record = library.record("m1", payload, magnet=seeder.magnet(payload))
        assert record.torrent_file_path is None
        await running.add(record)
        kept = await running.next_event(DownloadMetadataKept, lambda e: e.task_id == "m1")
        assert kept.torrent_path == str(library.torrents_dir / "m1.torrent")
        assert kept.name == payload.name
        assert torrent_info_hash(Path(kept.torrent_path).read_bytes()) == payload.info_hash
        await running.next_event(DownloadFinished, lambda e: e.task_id == "m1")
    assert library.hashes_match(payload)


async def test_a_file_with_priority_0_is_left_out(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library) as running:
        # Files in torrent order: extras/a.srt, movie.mkv.
        record = library.record("p1", payload, peers=(seeder.peer,), file_priorities=(1, 0))
        await running.add(record)
        await running.next_event(DownloadFinished, lambda e: e.task_id == "p1")
        (status,) = await running.session.status("p1")
    priorities = {entry.path: entry.priority for entry in status.files}
    assert priorities == {"Movie/extras/a.srt": 1, "Movie/movie.mkv": 0}
    assert library.hashes_match(payload, only={"Movie/extras/a.srt"})
    assert not (library.download_dir / "Movie" / "movie.mkv").exists()
    assert status.total_bytes == 40_000


async def test_paused_download_stays_paused_across_a_worker_restart_and_resumes(
    library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    async with running_session(library) as running:
        record = library.record(
            "pz", slow_payload, peers=(slow_seeder.peer,), status=DownloadStatus.PAUSED
        )
        await running.add(record)
        before = await running.wait_status("pz", lambda s: s.paused)
        pid = (await running.session.stats()).worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await running.next_event(WorkerRestarted)
        after = await running.wait_status("pz", lambda s: True)
        assert after.paused
        assert not after.auto_managed
        assert after.downloaded_bytes == before.downloaded_bytes == 0
        await running.session.resume("pz")
        await running.next_event(DownloadFinished, lambda e: e.task_id == "pz")
    assert library.hashes_match(slow_payload)


async def test_pause_stops_a_running_download(
    library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    async with running_session(library) as running:
        await running.add(library.record("pr", slow_payload, peers=(slow_seeder.peer,)))
        await running.wait_status("pr", lambda s: s.progress > 0.1)
        await running.session.pause("pr")
        await running.wait_status("pr", lambda s: s.paused and not s.auto_managed)
        # Not download_rate == 0: libtorrent's rate is a rolling average that takes 20-30 s to
        # fade after a pause. Stopped means no more bytes: three polls in a row agree.
        seen: list[int] = []

        def stopped(status: TorrentStatus) -> bool:
            seen.append(status.downloaded_bytes)
            return seen[-3:] == [seen[-1]] * 3

        paused = await running.wait_status("pr", stopped)
        assert not paused.finished
        # Paused means paused: the resume data written on pause says so too.
        await running.session.save_resume_data(only_if_modified=False)
        (again,) = await running.session.status("pr")
        assert again.paused
        assert again.downloaded_bytes == paused.downloaded_bytes


async def test_killed_worker_is_restarted_and_resumes_without_a_recheck(
    library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    resume_file = library.torrents_dir / "k1.fastresume"
    async with running_session(library, resume_save_interval=0.3) as running:
        await running.add(library.record("k1", slow_payload, peers=(slow_seeder.peer,)))
        # Periodic resume data appears while it downloads; kill at 30-60 %.
        at_kill = await running.wait_status(
            "k1",
            lambda s: (
                s.progress >= 0.3 and resume_file.exists() and resume_progress(resume_file) >= 0.2
            ),
        )
        assert at_kill.progress <= 0.6
        saved = resume_progress(resume_file)
        pid = (await running.session.stats()).worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await running.next_event(WorkerRestarted)
        # Once libtorrent has read the resume data (it reports 0 until then).
        first = await running.wait_status("k1", lambda s: s.state != "checking_resume_data")
        await running.next_event(DownloadFinished, lambda e: e.task_id == "k1")
        stats = await running.session.stats()
    assert stats.worker_restarts == 1
    assert stats.worker_pid not in (None, pid)
    assert not process_exists(pid)
    assert library.hashes_match(slow_payload)
    # Progress after the restart starts from the last resume data: at most one interval lost.
    assert first.progress >= saved - 0.01
    # What the seeder can send in one interval, plus libtorrent's 0.5 s status tick and the
    # time to write the file: without periodic saves the loss would be all of it (over 0.3).
    lost_at_most = SLOW_RATE * (0.3 + 0.5 + 0.5) / (8 * MiB)
    assert at_kill.progress - first.progress <= lost_at_most
    # And after the restart libtorrent took the resume data as it was: no checking of files.
    restart = next(i for i, e in enumerate(running.seen) if isinstance(e, WorkerRestarted))
    changes = [
        (e.previous, e.state) for e in running.seen[restart:] if isinstance(e, DownloadStateChanged)
    ]
    assert changes[0] == ("checking_resume_data", "downloading"), changes
    assert all("checking_files" not in change for change in changes), changes


async def test_hung_worker_is_replaced_within_the_heartbeat_deadline(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library, heartbeat_interval=0.2, heartbeat_timeout=0.5) as running:
        pid = (await running.session.stats()).worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        with anyio.fail_after(3.0):  # 0.2 s between pings + 0.5 s deadline + restart
            restarted = await running.next_event(WorkerRestarted)
        assert "hung" in restarted.reason
        assert not process_exists(pid)
        # The new worker works.
        await running.add(library.record("h1", payload, peers=(seeder.peer,)))
        await running.next_event(DownloadFinished, lambda e: e.task_id == "h1")


async def test_too_many_restarts_make_the_actor_fail_loudly(library: Library) -> None:
    with pytest.RaisesGroup(RestartIntensityExceeded, flatten_subgroups=True):
        async with running_session(library, max_restarts=2, backoff_initial=0.01) as running:
            for _ in range(3):
                pid = (await running.session.stats()).worker_pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                await running.next_event(WorkerRestarted)
            pid = (await running.session.stats()).worker_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await anyio.sleep_forever()


async def test_a_download_that_cannot_be_replayed_is_reported_failed(
    library: Library, payload: Payload
) -> None:
    record = library.record("lost", payload)
    Path(record.torrent_file_path or "").unlink()
    async with running_session(library) as running:
        await running.persistence.add(record)
    async with running_session(library) as running:
        errored = await running.next_event(DownloadErrored, lambda e: e.task_id == "lost")
        assert "cannot be resumed" in errored.error
        assert "lost.torrent" in errored.error
        stats = await running.session.stats()
    assert stats.resume_failures == 1
    assert stats.resumed_at_start == 0


async def test_unknown_libtorrent_setting_is_rejected_naming_the_key(library: Library) -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with running_session(library, libtorrent={"no_such_setting": 1}):
            pass
    error = first_dlkeeper_error(caught.value)
    assert isinstance(error, ConfigError)
    assert error.key == "libtorrent.no_such_setting"


@pytest.mark.parametrize("value", [-99_999_999_999_999, 2**31])
async def test_libtorrent_integer_setting_out_of_range_is_rejected(
    library: Library, value: int
) -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with running_session(library, libtorrent={"active_downloads": value}):
            pass
    error = first_dlkeeper_error(caught.value)
    assert isinstance(error, ConfigError)
    assert error.key == "libtorrent.active_downloads"
    assert "between" in error.reason


async def test_libtorrent_setting_of_the_wrong_type_is_rejected(library: Library) -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with running_session(library, libtorrent={"enable_dht": "yes"}):
            pass
    error = first_dlkeeper_error(caught.value)
    assert isinstance(error, ConfigError)
    assert error.key == "libtorrent.enable_dht"
    assert "boolean" in error.reason


async def test_clean_stop_saves_resume_data_of_every_download(
    library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    resume_file = library.torrents_dir / "s1.fastresume"
    # No periodic save within the test: only the stop can write the resume data.
    async with running_session(library, resume_save_interval=3600) as running:
        await running.add(library.record("s1", slow_payload, peers=(slow_seeder.peer,)))
        at_stop = await running.wait_status("s1", lambda s: s.progress >= 0.2)
        assert not resume_file.exists()
    # The live progress counts blocks of pieces still in flight; the resume data only whole
    # pieces (64 KiB of 8 MiB each), so it may be a few pieces behind, never far.
    assert resume_progress(resume_file) >= at_stop.progress - 0.05


async def test_unreadable_resume_data_costs_a_check_not_the_download(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    record = library.record("u1", payload, peers=(seeder.peer,))
    (library.torrents_dir / "u1.fastresume").mkdir()  # reading it fails with EISDIR
    async with running_session(library) as running:
        await running.persistence.add(record)
    async with running_session(library) as running:
        await running.next_event(DownloadFinished, lambda e: e.task_id == "u1")
        assert (await running.session.stats()).resume_failures == 0
    assert library.hashes_match(payload)


async def test_resume_data_of_another_torrent_is_not_used(
    library: Library, payload: Payload, seeder: Seeder, tmp_path: Path
) -> None:
    # A task_id reused by the bot while an old download's resume data was still on disk.
    other = make_payload(tmp_path / "other", "Other", {"x.bin": 300_000})
    with seeding(other) as other_seeder:
        async with running_session(library) as running:
            await running.add(library.record("same", other, peers=(other_seeder.peer,)))
            await running.next_event(DownloadFinished, lambda e: e.task_id == "same")
            await running.session.save_resume_data(only_if_modified=False)
            await running.persistence.remove("same")  # the record goes, the file stays
    assert (library.torrents_dir / "same.fastresume").exists()
    async with running_session(library) as running:
        await running.add(library.record("same", payload, peers=(seeder.peer,)))
        await running.next_event(DownloadFinished, lambda e: e.task_id == "same")
        (status,) = await running.session.status("same")
    assert status.info_hash == payload.info_hash
    assert library.hashes_match(payload)


async def test_stopped_download_leaves_no_torrent_copy_or_resume_data(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library) as running:
        await running.add(library.record("gone", payload, peers=(seeder.peer,)))
        await running.next_event(DownloadFinished, lambda e: e.task_id == "gone")
        await running.session.save_resume_data(only_if_modified=False)
        assert (library.torrents_dir / "gone.fastresume").exists()
        await running.session.remove("gone")
        assert await running.session.status() == ()
    assert not (library.torrents_dir / "gone.fastresume").exists()
    assert not (library.torrents_dir / "gone.torrent").exists()
    assert library.hashes_match(payload)  # the downloaded files stay


async def test_v2_only_magnet_download_reports_metadata_and_completion(
    library: Library, tmp_path: Path
) -> None:
    payload = make_payload(
        tmp_path / "v2", "V2", {"a.bin": 400_000, "b.bin": 1000}, flags=lt.create_torrent.v2_only
    )
    with seeding(payload) as seeder:
        async with running_session(library) as running:
            await running.add(library.record("v2", payload, magnet=seeder.magnet(payload)))
            await running.next_event(DownloadMetadataKept, lambda e: e.task_id == "v2")
            await running.next_event(DownloadFinished, lambda e: e.task_id == "v2")
    assert library.hashes_match(payload)


async def test_a_peer_given_by_host_name_is_connected(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library) as running:
        await running.add(library.record("n1", payload, peers=(f"localhost:{seeder.port}",)))
        await running.next_event(DownloadFinished, lambda e: e.task_id == "n1")
    assert library.hashes_match(payload)


async def test_a_worker_that_never_gets_ready_makes_the_actor_give_up(library: Library) -> None:
    silent = (sys.executable, "-c", "import sys; sys.stdin.read()")
    with pytest.RaisesGroup(RestartIntensityExceeded, ActorDied, flatten_subgroups=True):
        async with running_session(
            library,
            worker_command=silent,
            start_timeout=0.2,
            max_restarts=2,
            restart_window=0.1,  # shorter than one failed start: only "in a row" can count
            backoff_initial=0.01,
        ):
            pass


async def test_a_request_during_a_restart_waits_for_the_new_worker(
    library: Library, payload: Payload, seeder: Seeder
) -> None:
    async with running_session(library) as running:
        await running.add(library.record("w1", payload, peers=(seeder.peer,)))
        pid = (await running.session.stats()).worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(10):  # bounded: it waits for the replay, then answers
            (status,) = await running.session.status("w1")
        assert status.task_id == "w1"
        assert (await running.session.stats()).worker_pid not in (None, pid)


async def test_a_request_gets_not_ready_when_no_worker_comes_back_in_time(
    library: Library,
) -> None:
    async with running_session(library, request_timeout=0.5, backoff_initial=5.0) as running:
        pid = (await running.session.stats()).worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(5), pytest.raises(NotReady):
            await running.session.status()


async def test_files_are_whole_on_disk_when_finished_even_if_the_worker_dies_at_once(
    library: Library, tmp_path: Path
) -> None:
    big = make_payload(tmp_path / "big", "Big", {"a.bin": 96 * MiB, "b.bin": 32 * MiB})
    with seeding(big) as seeder:
        async with running_session(library) as running:
            await running.add(library.record("f1", big, peers=(seeder.peer,)))
            await running.next_event(DownloadFinished, lambda e: e.task_id == "f1")
            pid = (await running.session.stats()).worker_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert library.hashes_match(big)
            await running.next_event(WorkerRestarted)
            # The replay finds it complete (resume data or a check), never a wrong "have".
            await running.next_event(DownloadFinished, lambda e: e.task_id == "f1")
    assert library.hashes_match(big)


async def test_a_command_sent_while_its_download_is_being_added_waits_for_the_add(
    library: Library, slow_payload: Payload
) -> None:
    # The worker knew only the torrents whose add libtorrent had confirmed: a pause written
    # right behind the add was `not_found`, and the download ran on unpaused.
    async with running_session(library) as running:
        record = library.record("racing", slow_payload, status=DownloadStatus.QUEUED)
        await running.persistence.add(record)
        async with anyio.create_task_group() as both:
            both.start_soon(
                functools.partial(
                    running.session.add, record, fresh=True, torrent=slow_payload.torrent
                )
            )
            await anyio.lowlevel.checkpoint()  # the add goes first, in the same write
            both.start_soon(running.session.pause, "racing")
        (status,) = await running.session.status("racing")
        assert not status.auto_managed and status.paused


async def test_a_change_saved_after_a_restarts_replay_began_reaches_the_new_worker(
    library: Library, tmp_path: Path
) -> None:
    # A replay reads every download's .torrent before it adds any; these name a large one of
    # another torrent (each is read, hashed, then passed over for the magnet), so the new
    # worker is not ready for longer than request_timeout. A pause saved meanwhile met no
    # ready worker (`not_ready`) and, not in the replay's snapshot, was never applied.
    other = tmp_path / "other.torrent"
    pieces = 1_500_000
    info = b"d6:lengthi%de4:name5:o.bin12:piece lengthi16384e6:pieces%d:" % (
        pieces * 16384,
        pieces * 20,
    )
    other.write_bytes(b"d4:info" + info + os.urandom(pieces * 20) + b"ee")
    records = {
        f"s{number:02d}": make_record(f"s{number:02d}", DownloadStatus.QUEUED).model_copy(
            update={"torrent_file_path": str(other), "save_path": str(library.download_dir)}
        )
        for number in range(24)
    }
    store = StateStore(library.state_dir, MigrationContext(download_path=library.download_dir))
    store.acquire_lock()
    try:
        store.write(records)
    finally:
        store.release_lock()
    async with running_session(library, request_timeout=0.5) as running:
        first = (await running.session.stats()).worker_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with anyio.fail_after(DEADLINE):
            while True:  # until the new worker is up: then its replay has taken its snapshot
                if (await running.session.stats()).worker_pid not in (None, first):
                    break
                await anyio.sleep(0.005)
        await running.persistence.update("s00", RecordChanges(status=DownloadStatus.PAUSED))
        with pytest.raises(NotReady):
            await running.session.pause("s00")
        with anyio.fail_after(DEADLINE):
            while True:
                with contextlib.suppress(NotReady):
                    (status,) = await running.session.status("s00")
                    break
                await anyio.sleep(0.05)
        assert not status.auto_managed  # paused, as saved


async def test_temporary_files_a_crash_left_in_the_torrents_folder_are_removed_at_start(
    library: Library,
) -> None:
    library.torrents_dir.mkdir(parents=True)
    leftovers = [
        library.torrents_dir / ".k1.fastresume.x8f2k1.tmp",
        library.torrents_dir / ".k1.torrent.q9zz0a.tmp",
    ]
    kept = [library.torrents_dir / "k1.fastresume", library.torrents_dir / ".notes.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"half written")
    async with running_session(library):
        assert [path for path in leftovers if path.exists()] == []
        assert all(path.exists() for path in kept)  # only what dlkeeper's writes leave
