"""The state file when the disk fails for real: a full disk under a completion, an I/O error
after the rename. Whatever the disk does, what the daemon answers from is what is on disk, no
change is answered ok before it is there, and nothing the state file refused is dropped."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import orjson
import pytest

from actors.bus import EventBus
from actors.errors import StateWriteFailed
from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from actors.messages.session import (
    DownloadErrored,
    DownloadFinished,
    DownloadProgressKept,
    SessionEvent,
)
from actors.monitor import MonitorActor
from actors.persistence import Persistence, PersistenceActor
from actors.problems import Problems
from actors.state import DownloadStatus, MigrationContext
from actors.statefile import StateStore
from tests.api import (
    DEADLINE,
    Library,
    b64,
    code_of,
    make_library,
    new_payload,
    seeding_now,
    wait_event,
    wait_until,
)
from tests.daemons import Daemon, RawClient
from tests.mounts import fill, needs_root, tmpfs
from tests.records import make_record
from tests.test_stop import children
from tests.torrents import Payload, make_payload

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="needs strace (.ci/run installs it)")


@contextlib.contextmanager
def daemon_on(library: Library, command_prefix: Sequence[str] = ()) -> Iterator[Daemon]:
    """A ready daemon on `library`, maybe under strace; it and what it started are killed
    after (strace killed leaves its tracees running, so they are killed by pid)."""
    daemon = Daemon(library.config, command_prefix=command_prefix)
    try:
        yield daemon.wait_ready()
    finally:
        tracees = children(daemon.process.pid) if command_prefix else []
        daemon.close()
        for pid in tracees:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def listed_problems(client: RawClient) -> list[str] | None:
    """`problems` of ping and of stats, which must agree; None while the API has no such key."""
    ping, stats = client.call("ping"), client.call("stats")
    if "problems" not in ping:
        return None
    assert ping["problems"] == stats["problems"], (ping, stats)
    problems: list[str] = ping["problems"]
    return problems


def no_event(client: RawClient, name: str, task_id: str, within: float) -> bool:
    try:
        wait_event(client, name, task_id, timeout=within)
    except AssertionError:
        return True
    return False


@needs_root
@pytest.mark.timeout(120)
def test_a_completion_the_full_disk_refused_is_saved_and_published_once_there_is_space(
    tmp_path: Path,
) -> None:
    # The state folder on a 1 MiB tmpfs, filled while the download runs: its completion's
    # state write fails with ENOSPC. It used to be logged and dropped: the download stayed
    # `downloading` and nothing was published until a restart made libtorrent report it again.
    library = make_library(tmp_path)
    payload = make_payload(tmp_path / "seed", "Full", {"e01.mkv": 3 << 20})
    with (
        tmpfs(library.layout.state_dir, "1m") as state_dir,
        seeding_now(payload, upload_rate_limit=1 << 20) as seeder,
        daemon_on(library) as daemon,
        daemon.client() as client,
        daemon.client() as events,
    ):
        events.call("subscribe")
        client.call("add", torrent_b64=b64(payload.torrent), task_id="full", peers=[seeder.peer])
        wait_until(lambda: library.state()["full"]["status"] == "downloading", "the start saved")
        filler = fill(state_dir)

        def finished_in_libtorrent() -> bool:
            return bool(client.call("get", task_id="full")["progress"] == 1.0)

        wait_until(finished_in_libtorrent, "libtorrent to finish the download", timeout=30)
        wait_until(
            lambda: (
                "problem: the completion of download full is not saved yet"
                in daemon.log.read_text()
            ),
            "the refused completion to be reported",
        )
        # Not published, not saved, and said to be a problem, in ping and stats too.
        assert no_event(events, "download.completed", "full", within=1.0)
        assert library.state()["full"]["status"] == "downloading"
        assert "problem: the state file" in daemon.log.read_text()
        problems = listed_problems(client)
        if problems is not None:
            assert any("full" in problem for problem in problems), problems
            assert any(str(library.state_file) in problem for problem in problems), problems

        filler.unlink()  # space again, and no restart
        started = time.monotonic()
        event = wait_event(events, "download.completed", "full", timeout=45)
        retried_within = time.monotonic() - started
        assert event["completed_at"] is not None
        saved = library.state()["full"]
        assert saved["status"] == "completed"
        assert saved["progress"] == 1.0
        # The problem ends once the events queued behind the completion are recorded too.
        wait_until(
            lambda: "problem over: the completion of download full" in daemon.log.read_text(),
            "the end of the problem to be logged",
        )
        assert "problem over: the state file" in daemon.log.read_text()
        problems = listed_problems(client)
        assert problems is None or problems == [], problems
        # Published once: a new subscriber is re-offered it, this one got no second copy.
        assert no_event(events, "download.completed", "full", within=0.5)
    assert retried_within < 40, retried_within


def add_until_saved(client: RawClient, payload: Payload, task_id: str) -> None:
    """Adds `payload` until an add is answered ok; each refused one is on disk nowhere."""

    def added() -> bool:
        reply = client.request("add", torrent_b64=b64(payload.torrent), task_id=task_id)
        if not reply["ok"]:
            assert code_of(reply) == "internal", reply
            assert code_of(client.request("get", task_id=task_id)) == "not_found"
        return bool(reply["ok"])

    wait_until(added, f"the add of {task_id} to be saved")
    assert client.call("get", task_id=task_id)["task_id"] == task_id


@needs_root
@needs_strace
@pytest.mark.timeout(90)
def test_an_io_error_after_the_rename_leaves_the_state_file_as_the_daemon_answers(
    tmp_path: Path,
) -> None:
    # The first fsync of the state folder (the first add's write, after its rename) fails with
    # EIO. The add used to be refused while downloads.json kept it, so `get` said not_found
    # and a restart brought it back; now the saved state is written again.
    library = make_library(tmp_path)
    state_dir = library.layout.state_dir
    state_dir.mkdir()
    assert STRACE is not None
    eio_once = [STRACE, "-f", "-qq", "-o", "/dev/null", "-P", str(state_dir)]
    eio_once += ["-e", "trace=fsync", "-e", "inject=fsync:error=EIO:when=1"]
    refused, later = new_payload(tmp_path / "refused"), new_payload(tmp_path / "later")
    with daemon_on(library, eio_once) as daemon, daemon.client() as client:
        reply = client.request("add", torrent_b64=b64(refused.torrent), task_id="refused")
        assert not reply["ok"], reply
        assert code_of(reply) == "internal"
        assert code_of(client.request("get", task_id="refused")) == "not_found"
        # The disk agrees with the answer: the rewrite of the saved state (tried at once) took
        # the refused add out of downloads.json, and the copy of its .torrent is gone.
        wait_until(lambda: "refused" not in library.state() or None, "the state rewritten", 10)
        assert not (library.torrents / "refused.torrent").exists()
        wait_until(
            lambda: "problem over: the state file" in daemon.log.read_text(),
            "the end of the problem to be logged",
        )
        assert listed_problems(client) in (None, [])
        # Changes are saved again; the refused torrent is in libtorrent under no task_id.
        # (strace counts fsyncs per thread: the first of each new thread of the daemon's pool
        # fails too, so an add may still be refused, and is then retried.)
        add_until_saved(client, later, "later")
        add_until_saved(client, refused, "refused-again")
        assert set(library.state()) == {"later", "refused-again"}
        (worker_and_daemon,) = children(daemon.process.pid)
        os.kill(worker_and_daemon, signal.SIGTERM)  # the daemon itself, not strace
        assert daemon.process.wait(DEADLINE) == 0
    with daemon_on(library) as daemon, daemon.client() as client:
        assert code_of(client.request("get", task_id="refused")) == "not_found"
        listed = {info["task_id"] for info in client.call("list")["downloads"]}
        assert listed == {"later", "refused-again"}


async def reported(problems: Problems, *keys: str, timeout: float = 10.0) -> None:
    """Returns once every one of `keys` is a current problem (Problems has no event to wait
    on: it is polled, under a deadline)."""
    for _ in range(int(timeout / 0.02)):
        if all(problems.has(key) for key in keys):
            return
        await anyio.sleep(0.02)
    raise AssertionError(f"not reported within {timeout:g} s: {keys}; now: {problems.current()}")


@needs_root
@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_refused_completion_is_retried_in_order_and_changes_meanwhile_fail_fast(
    tmp_path: Path,
) -> None:
    # The monitor and persistence actors on a real full tmpfs, fed the session's events.
    state_dir = tmp_path / "data"
    with tmpfs(state_dir, "1m"):
        store = StateStore(state_dir, MigrationContext(download_path=tmp_path / "downloads"))
        problems, bus = Problems(), EventBus()
        published = bus.subscribe()
        report, events = anyio.create_memory_object_stream[SessionEvent](math.inf)
        async with actor_group() as group:
            persistence = Persistence(await group.start(PersistenceActor(store, problems)))
            await persistence.add(make_record("a"))
            await persistence.add(make_record("b"))
            await group.start(MonitorActor(persistence, events, bus, problems))
            filler = fill(state_dir)
            report.send_nowait(DownloadFinished(task_id="a"))
            # Behind it: an error of the same download, which must not overtake it (it would
            # make it failed, and the completion then finds nothing active to complete).
            report.send_nowait(DownloadErrored(task_id="a", error="a tracker said no"))
            report.send_nowait(DownloadProgressKept(task_id="b", progress=0.5))
            await reported(problems, "state-write", "record:a")
            # While the rewrite keeps failing, a change is refused at once, not left waiting.
            with anyio.fail_after(2), pytest.raises(StateWriteFailed):
                await persistence.update("b", RecordChanges(progress=0.75))
            assert (await persistence.get("a")).status is DownloadStatus.DOWNLOADING
            with pytest.raises(anyio.WouldBlock):
                published.events.receive_nowait()

            filler.unlink()
            with anyio.fail_after(40):
                event = await published.events.receive()
            assert event.model_dump()["event"] == "download.completed"
            assert (await persistence.get("a")).status is DownloadStatus.COMPLETED
            on_disk = orjson.loads(store.path.read_bytes())["downloads"]
            assert on_disk["a"]["status"] == "completed"
            assert on_disk["b"]["progress"] == 0.0  # refused, and not retried: the next will do
            assert problems.current() == []
            with pytest.raises(anyio.WouldBlock):
                published.events.receive_nowait()  # no download.failed after it
        report.close()
