"""The persistence actor and its store: group commit, reads, refusals, loading, backups, lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest
from anyio import wait_all_tasks_blocked

from actors.errors import (
    ActorDied,
    BadRequest,
    Duplicate,
    NotFound,
    StaleChange,
    StateError,
    StateLocked,
    StateTooNew,
)
from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from actors.persistence import Persistence, PersistenceActor
from actors.state import DownloadRecord, DownloadStatus, MigrationContext
from actors.statefile import LoadReport, LoadSource, StateStore
from tests.records import make_record

pytestmark = pytest.mark.anyio

DEADLINE = 20.0


class GatedStore(StateStore):
    """The real store, whose next write can be held at the gate (to see what waits for it)."""

    def __init__(self, directory: Path, migration: MigrationContext) -> None:
        super().__init__(directory, migration)
        self.gate = threading.Event()
        self.gate.set()
        self.written: list[frozenset[str]] = []

    def write(self, downloads: Mapping[str, DownloadRecord], *, keep_backup: bool = True) -> None:
        assert self.gate.wait(DEADLINE), "the test never opened the gate"
        super().write(downloads, keep_backup=keep_backup)
        self.written.append(frozenset(downloads))


@asynccontextmanager
async def running(store: StateStore) -> AsyncIterator[Persistence]:
    async with actor_group() as group:
        yield Persistence(await group.start(PersistenceActor(store)))


def on_disk(store: StateStore) -> dict[str, object]:
    data = orjson.loads(store.path.read_bytes())
    assert isinstance(data, dict)
    downloads = data["downloads"]
    assert isinstance(downloads, dict)
    return downloads


@pytest.fixture
def gated(state_dir: Path, tmp_path: Path) -> GatedStore:
    return GatedStore(state_dir, MigrationContext(download_path=tmp_path / "downloads"))


# --- group commit and reads ----------------------------------------------------------------------


async def test_mutations_arriving_during_a_write_share_the_next_write(gated: GatedStore) -> None:
    with anyio.fail_after(DEADLINE):
        async with running(gated) as persistence:
            gated.gate.clear()
            answered: list[str] = []

            async def add(task_id: str) -> None:
                await persistence.add(make_record(task_id))
                # The reply comes only after a write that holds the change has returned.
                assert any(task_id in written for written in gated.written)
                answered.append(task_id)

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(add, "first")
                await wait_all_tasks_blocked()  # the first write is now held at the gate
                for n in range(999):
                    task_group.start_soon(add, f"t{n}")
                await wait_all_tasks_blocked()
                assert answered == []  # nothing is acknowledged before its fsync
                gated.gate.set()
            assert len(answered) == 1000
            assert len(gated.written) == 2  # 1,000 mutations, two writes
            assert (await persistence.stats()).writes == 2
    assert len(on_disk(gated)) == 1000


async def test_reads_answer_while_a_write_is_under_way(gated: GatedStore) -> None:
    with anyio.fail_after(DEADLINE):
        async with running(gated) as persistence:
            await persistence.add(make_record("saved"))
            gated.gate.clear()
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(persistence.add, make_record("unsaved"))
                await wait_all_tasks_blocked()
                # The write of "unsaved" is held, yet reads answer, with the state last saved.
                snapshot = await persistence.snapshot()
                assert set(snapshot) == {"saved"}
                assert (await persistence.get("saved")).task_id == "saved"
                with pytest.raises(NotFound):
                    await persistence.get("unsaved")
                gated.gate.set()
            assert set(await persistence.snapshot()) == {"saved", "unsaved"}


async def test_a_saved_change_is_read_back_by_its_caller(store: StateStore) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("a"))
        changed = await persistence.update(
            "a", RecordChanges(progress=0.5, status=DownloadStatus.PAUSED, peers=("127.0.0.1:9",))
        )
        assert changed.progress == 0.5
        assert (await persistence.get("a")) == changed
        assert on_disk(store)["a"] == orjson.loads(changed.to_json())


# --- refusals change nothing ---------------------------------------------------------------------


async def test_adding_an_existing_task_id_as_another_torrent_is_a_duplicate_naming_it(
    store: StateStore,
) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("a"))
        with pytest.raises(Duplicate) as caught:
            await persistence.add(make_record("a", info_hash="f" * 40, progress=0.9))
        assert caught.value.task_id == "a"
        assert (await persistence.get("a")).progress == 0.0
        assert (await persistence.stats()).writes == 1


async def test_adding_a_torrent_another_download_has_is_a_duplicate_naming_that_one(
    store: StateStore,
) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("first", info_hash="e" * 40))
        with pytest.raises(Duplicate) as caught:
            await persistence.add(make_record("second", info_hash="e" * 40))
        assert caught.value.task_id == "first"
        assert set(on_disk(store)) == {"first"}
        assert (await persistence.stats()).writes == 1


async def test_adding_the_same_download_again_returns_the_saved_one_without_a_write(
    store: StateStore,
) -> None:
    async with running(store) as persistence:
        saved = (await persistence.add(make_record("a"))).record
        again = await persistence.add(make_record("a", progress=0.9))
        assert again.existed
        assert again.record == saved
        assert (await persistence.stats()).writes == 1


async def test_a_torrent_is_free_again_once_its_download_is_removed(store: StateStore) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("old", info_hash="d" * 40))
        await persistence.remove("old")
        added = await persistence.add(make_record("new", info_hash="d" * 40))
        assert not added.existed
        assert set(on_disk(store)) == {"new"}


async def test_concurrent_adds_of_one_torrent_save_exactly_one(store: StateStore) -> None:
    outcomes: list[str] = []

    async def add(task_id: str) -> None:
        try:
            await persistence.add(make_record(task_id, info_hash="c" * 40))
            outcomes.append(task_id)
        except Duplicate as exc:
            outcomes.append(f"duplicate of {exc.task_id}")

    async with running(store) as persistence, anyio.create_task_group() as task_group:
        for number in range(20):
            task_group.start_soon(add, f"t{number}")
    winners = [outcome for outcome in outcomes if not outcome.startswith("duplicate")]
    assert len(winners) == 1
    assert outcomes.count(f"duplicate of {winners[0]}") == 19
    assert set(on_disk(store)) == {winners[0]}


async def test_changing_an_unknown_download_is_not_found(store: StateStore) -> None:
    async with running(store) as persistence:
        with pytest.raises(NotFound, match="no download ghost"):
            await persistence.update("ghost", RecordChanges(progress=0.1))
        with pytest.raises(NotFound):
            await persistence.remove("ghost")
        with pytest.raises(NotFound):
            await persistence.ack("ghost")
        assert (await persistence.stats()).writes == 0
    assert not store.path.exists()


async def test_ack_forgets_only_finished_downloads(store: StateStore) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("busy"))
        await persistence.add(make_record("done", DownloadStatus.COMPLETED))
        await persistence.add(make_record("broken", DownloadStatus.FAILED))
        with pytest.raises(BadRequest, match="only completed or failed"):
            await persistence.ack("busy")
        assert (await persistence.ack("done")).task_id == "done"
        await persistence.ack("broken")
        assert set(await persistence.snapshot()) == {"busy"}
    assert set(on_disk(store)) == {"busy"}


async def test_remove_forgets_a_download(store: StateStore) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("a"))
        removed = await persistence.remove("a")
        assert removed.task_id == "a"
        assert await persistence.snapshot() == {}
    assert on_disk(store) == {}


def test_a_write_the_disk_refuses_fails_its_callers_and_keeps_the_state(tmp_path: Path) -> None:
    # A real refusal from the kernel: RLIMIT_FSIZE makes a write past the limit fail with EFBIG,
    # in a child process so that the limit touches nothing else.
    script = f"""
import resource, signal, anyio
from pathlib import Path
from actors.persistence import Persistence, PersistenceActor
from actors.state import MigrationContext
from actors.statefile import StateStore
from actors.errors import NotFound, StateWriteFailed
from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from tests.records import make_record

async def main() -> None:
    store = StateStore(Path({str(tmp_path / "data")!r}), MigrationContext(Path("/dl")))
    async with actor_group() as group:
        persistence = Persistence(await group.start(PersistenceActor(store)))
        await persistence.add(make_record("small"))
        before = store.path.read_bytes()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 200, len(before) + 200))
        big = make_record("big").model_copy(update={{"torrent_metadata": {{"x": "y" * 5000}}}})
        try:
            await persistence.add(big)
        except StateWriteFailed as error:
            print("refused:", error)
        assert store.path.read_bytes() == before, "the state on disk changed"
        try:
            await persistence.get("big")
        except NotFound:
            print("not kept")
        changed = await persistence.update("small", RecordChanges(progress=0.25))
        print("later change saved:", changed.progress)
    print("on disk:", sorted(__import__("orjson").loads(store.path.read_bytes())["downloads"]))

anyio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=Path(__file__).parent.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "refused: could not save the download state: [Errno 27] File too large"
    )
    assert lines[1:] == ["not kept", "later change saved: 0.25", "on disk: ['small']"]


# --- loading -------------------------------------------------------------------------------------


def locked_load(store: StateStore) -> tuple[dict[str, DownloadRecord], LoadReport]:
    store.acquire_lock()
    try:
        return store.load()
    finally:
        store.release_lock()


def write_state(store: StateStore, downloads: dict[str, DownloadRecord]) -> None:
    store.acquire_lock()
    try:
        store.write(downloads)
    finally:
        store.release_lock()


def test_each_write_keeps_the_previous_state_as_bak(store: StateStore) -> None:
    store.acquire_lock()
    try:
        store.write({"a": make_record("a")})
        assert not store.backup_path.exists()
        first = store.path.read_bytes()
        store.write({"a": make_record("a"), "b": make_record("b")})
        assert store.backup_path.read_bytes() == first
        second = store.path.read_bytes()
        store.write({})
        assert store.backup_path.read_bytes() == second
    finally:
        store.release_lock()


def test_a_crash_between_backup_link_and_rename_leaves_both_files_whole(store: StateStore) -> None:
    write_state(store, {"a": make_record("a")})
    write_state(store, {"a": make_record("a"), "b": make_record("b")})
    # What a crash after step 2's link and before its rename leaves: a temporary link to the
    # current file (and an orphan temporary state file from step 1).
    os.link(store.path, store.directory / ".downloads.json.bak.tmp")
    (store.directory / ".downloads.json.abc123.tmp").write_bytes(b'{"version":1,"downl')
    downloads, report = locked_load(store)
    assert set(downloads) == {"a", "b"}
    assert report.source is LoadSource.FILE
    assert sorted(p.name for p in store.directory.glob(".*")) == []  # leftovers removed
    write_state(store, {"c": make_record("c")})
    assert set(orjson.loads(store.backup_path.read_bytes())["downloads"]) == {"a", "b"}


def test_a_corrupt_file_is_kept_aside_and_the_backup_loaded(store: StateStore) -> None:
    write_state(store, {"a": make_record("a")})
    write_state(store, {"a": make_record("a"), "b": make_record("b")})
    garbage = b'{"version": 1, "downloads": {"a": {"task_id": "a", "na'
    store.path.write_bytes(garbage)
    downloads, report = locked_load(store)
    assert set(downloads) == {"a"}  # the backup: the state before the last write
    assert report.source is LoadSource.BACKUP
    (kept,) = store.directory.glob("downloads.json.corrupt-*")
    assert kept.read_bytes() == garbage
    # The backup was put back in place as the state file.
    assert set(orjson.loads(store.path.read_bytes())["downloads"]) == {"a"}


def test_a_corrupt_file_and_backup_are_both_kept_and_the_start_is_empty(store: StateStore) -> None:
    write_state(store, {"a": make_record("a")})
    write_state(store, {"b": make_record("b")})
    store.path.write_bytes(b"\x00\x01 not json")
    store.backup_path.write_bytes(b"[]")
    downloads, report = locked_load(store)
    assert downloads == {}
    assert report.source is LoadSource.EMPTY
    assert (
        next(store.directory.glob("downloads.json.corrupt-*"))
    ).read_bytes() == b"\x00\x01 not json"
    assert (next(store.directory.glob("downloads.json.bak.corrupt-*"))).read_bytes() == b"[]"
    assert len(report.problems) == 2


def test_two_quarantines_in_one_second_keep_both_files(store: StateStore) -> None:
    for content in (b"first", b"second"):
        store.path.write_bytes(content)
        locked_load(store)
    kept = sorted(p.read_bytes() for p in store.directory.glob("downloads.json.corrupt-*"))
    assert kept == [b"first", b"second"]


def test_a_lost_state_file_is_recovered_from_the_backup(store: StateStore) -> None:
    write_state(store, {"a": make_record("a")})
    write_state(store, {"a": make_record("a"), "b": make_record("b")})
    store.path.unlink()
    downloads, report = locked_load(store)
    assert set(downloads) == {"a"}
    assert report.source is LoadSource.BACKUP


def test_a_file_from_a_newer_dlkeeper_is_refused_and_left_alone(store: StateStore) -> None:
    newer = b'{"version": 2, "downloads": {}, "shiny": true}'
    store.path.write_bytes(newer)
    with pytest.raises(StateTooNew, match="schema version 2"):
        locked_load(store)
    assert store.path.read_bytes() == newer
    assert list(store.directory.glob("downloads.json.corrupt-*")) == []


async def test_the_actor_reports_how_the_state_was_loaded(store: StateStore) -> None:
    write_state(store, {"a": make_record("a")})
    store.path.write_bytes(b"garbage")
    async with running(store) as persistence:
        stats = await persistence.stats()
    assert stats.load_source == "empty"
    assert len(stats.quarantined) == 1
    assert stats.load_problems[0].startswith("downloads.json: not JSON")


# --- the lock ------------------------------------------------------------------------------------


async def test_a_second_actor_on_the_same_library_cannot_start(store: StateStore) -> None:
    async with running(store):
        second = StateStore(store.directory, store.migration)
        with pytest.RaisesGroup(StateLocked, flatten_subgroups=True) as caught:
            async with running(second):
                pass
        (error,) = caught.value.exceptions
        assert isinstance(error, StateLocked)
        assert error.lock_path == store.lock_path
    # Stopped: the lock is free again.
    async with running(StateStore(store.directory, store.migration)) as persistence:
        assert await persistence.snapshot() == {}


async def test_asks_after_the_actor_stopped_fail_with_actor_died(store: StateStore) -> None:
    async with running(store) as persistence:
        pass
    with pytest.raises(ActorDied):
        await persistence.snapshot()


HOLD_LOCK = """
import sys
from pathlib import Path
from actors.state import MigrationContext
from actors.statefile import StateStore
store = StateStore(Path(sys.argv[1]), MigrationContext(Path("/dl")))
store.acquire_lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_another_process_cannot_take_the_lock_until_the_holder_is_killed(store: StateStore) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StateLocked):
            store.acquire_lock()
        holder.send_signal(signal.SIGKILL)
        holder.wait(DEADLINE)
        store.acquire_lock()  # the kernel dropped the dead holder's lock
        store.release_lock()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(DEADLINE)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def test_load_and_write_refuse_to_run_without_the_lock(store: StateStore) -> None:
    with pytest.raises(StateError, match="not held"):
        store.write({})
    with pytest.raises(StateError, match="not held"):
        store.load()


async def test_a_conditional_update_applies_only_while_the_status_is_as_expected(
    store: StateStore,
) -> None:
    async with running(store) as persistence:
        await persistence.add(make_record("a", DownloadStatus.QUEUED))
        await persistence.update("a", RecordChanges(status=DownloadStatus.PAUSED))
        with pytest.raises(StaleChange, match="download a is paused now"):
            await persistence.update(
                "a",
                RecordChanges(status=DownloadStatus.DOWNLOADING),
                if_status={DownloadStatus.QUEUED},
            )
        assert (await persistence.get("a")).status is DownloadStatus.PAUSED
        changed = await persistence.update(
            "a", RecordChanges(progress=0.5), if_status={DownloadStatus.PAUSED}
        )
        assert changed.progress == 0.5
