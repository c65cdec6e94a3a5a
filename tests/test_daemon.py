"""End-to-end scenarios: real `dlkeeper serve` processes, driven through their real socket,
downloading from a real libtorrent seeder on 127.0.0.1, stopped with SIGTERM and killed with
SIGKILL (the daemon, and its libtorrent worker)."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import libtorrent as lt
import pytest

from tests.daemons import Daemon, RawClient, write_config
from tests.sessions import Library, resume_progress
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

T = TypeVar("T")

MiB = 1024 * 1024
SLOW_RATE = 3 * MiB // 2  # bytes/s: a 6 MiB payload takes four seconds, time to act part-way
SLOW_PIECE = 64 * 1024
# libtorrent's progress counts the blocks of pieces in flight, resume data whole pieces only.
IN_FLIGHT = 4 * SLOW_PIECE / (6 * MiB)
DEADLINE = 30.0
WORKER_MODULE = "actors.session_worker"


# --- helpers --------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Polls `condition` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = stat.rpartition(")")[2].split()[:2]
    return state, int(ppid)


def process_alive(pid: int) -> bool:
    """A process that runs (or is stopped); a zombie is dead, only not yet reaped."""
    state = process_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def process_gone(pid: int) -> bool:
    return not process_alive(pid)


def worker_pids(daemon_pid: int) -> list[int]:
    """The libtorrent workers of a daemon: its children running `actors.session_worker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        state = process_state(int(entry.name))
        if state is None or state[1] != daemon_pid or state[0] in ("Z", "X"):
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if WORKER_MODULE.encode() in command:
            found.append(int(entry.name))
    return found


def worker_pid(daemon: Daemon) -> int:
    """The daemon's one running worker (waits for it during a restart)."""

    def single() -> int | None:
        pids = worker_pids(daemon.process.pid)
        return pids[0] if len(pids) == 1 else None

    return wait_for(single, "the daemon's libtorrent worker")


def set_upload_rate(seeder: Seeder, rate: int) -> None:
    """Changes the seeder's upload limit (bytes/s, 0 = none) while it seeds."""
    session = seeder.session
    local = session.get_peer_class(session.local_peer_class_id)
    session.set_peer_class(session.local_peer_class_id, {**local, "upload_limit": rate})


def b64(payload: Payload) -> str:
    return base64.b64encode(payload.torrent).decode()


def random_magnet() -> str:
    """A magnet of a torrent no one has: it stays fetching metadata, which is all it must do."""
    return f"magnet:?xt=urn:btih:{secrets.token_hex(20)}"


def state_downloads(library: Library) -> dict[str, dict[str, Any]]:
    """The downloads in downloads.json (replaced atomically: always whole when read)."""
    state = json.loads((library.state_dir / "downloads.json").read_bytes())
    downloads: dict[str, dict[str, Any]] = state["downloads"]
    return downloads


def get(client: RawClient, task_id: str) -> dict[str, Any]:
    info: dict[str, Any] = client.call("get", task_id=task_id)
    return info


def listed(client: RawClient) -> dict[str, dict[str, Any]]:
    return {info["task_id"]: info for info in client.call("list")["downloads"]}


def first_event_after_subscribing(daemon: Daemon) -> dict[str, Any]:
    """Subscribes, adds a magnet, and returns the first event the subscriber gets: it is that
    `download.added` unless an unacknowledged completion (always sent first) came before it."""
    with daemon.client() as subscriber, daemon.client() as adder:
        subscriber.call("subscribe")
        adder.call("add", magnet=random_magnet())
        return subscriber.next_event()


@dataclass
class Daemons:
    """The daemons of one test, on one config. Every daemon and every worker it started is
    gone when the test ends: `close()` kills what is left and fails on a leftover worker."""

    config: Path
    started: list[Daemon] = field(default_factory=list)
    workers: set[int] = field(default_factory=set)

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(self.config, env)
        self.started.append(daemon)
        return daemon.wait_ready()

    def _note_workers(self, daemon: Daemon) -> list[int]:
        pids = worker_pids(daemon.process.pid)
        self.workers.update(pids)
        return pids

    def stop(self, daemon: Daemon) -> int:
        """SIGTERM: the exit status, once the daemon and its worker are gone."""
        pids = self._note_workers(daemon)
        status = daemon.stop()
        self.wait_gone(pids)
        return status

    def kill(self, daemon: Daemon) -> None:
        """SIGKILL: returns once the daemon is reaped and its orphaned worker has exited (it
        sees its stdin close)."""
        pids = self._note_workers(daemon)
        daemon.kill()
        self.wait_gone(pids)

    def restart(self, daemon: Daemon, *, kill: bool = False) -> Daemon:
        if kill:
            self.kill(daemon)
        else:
            assert self.stop(daemon) == 0
        return self.start()

    @staticmethod
    def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
        for pid in pids:
            wait_for(functools.partial(process_gone, pid), f"worker {pid} to exit", timeout)

    def close(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                self._note_workers(daemon)
            daemon.close()
        leftovers = []
        deadline = time.monotonic() + 10.0
        for pid in sorted(self.workers):
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process_alive(pid):
                leftovers.append(pid)
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"workers outlived their daemon: {leftovers}"


@pytest.fixture
def library(tmp_path: Path) -> Library:
    return Library(tmp_path / "library")


def make_daemons(
    tmp_path: Path, library: Library, resume_save_interval: float = 60.0
) -> Iterator[Daemons]:
    config = write_config(tmp_path / "etc", library.root, resume_save_interval=resume_save_interval)
    daemons = Daemons(config)
    try:
        yield daemons
    finally:
        daemons.close()


@pytest.fixture
def daemons(tmp_path: Path, library: Library) -> Iterator[Daemons]:
    """Daemons that save resume data only on pause, on completion and on stop."""
    yield from make_daemons(tmp_path, library)


@pytest.fixture
def saving_daemons(tmp_path: Path, library: Library) -> Iterator[Daemons]:
    """Daemons that save the resume data of changed torrents every half second."""
    yield from make_daemons(tmp_path, library, resume_save_interval=0.5)


@pytest.fixture
def slow_payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "slow", "Slow", {"big.bin": 6 * MiB}, piece_size=SLOW_PIECE)


@pytest.fixture
def slow_seeder(slow_payload: Payload) -> Iterator[Seeder]:
    with seeding(slow_payload, upload_rate_limit=SLOW_RATE) as running:
        yield running


@pytest.fixture
def payload(tmp_path: Path) -> Payload:
    return make_payload(tmp_path / "seed", "Movie", {"movie.mkv": 2 * MiB, "extras/a.srt": 40_000})


@pytest.fixture
def seeder(payload: Payload) -> Iterator[Seeder]:
    with seeding(payload) as running:
        yield running


def add_from(client: RawClient, task_id: str, payload: Payload, seeder: Seeder) -> None:
    result = client.call("add", task_id=task_id, torrent_b64=b64(payload), peers=[seeder.peer])
    assert result["info_hash"] == payload.info_hash


def wait_progress(
    client: RawClient, task_id: str, condition: Callable[[float], bool], what: str
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        info = get(client, task_id)
        return info if condition(info["progress"]) else None

    return wait_for(reached, f"{task_id} at {what}")


def wait_loaded(client: RawClient, task_id: str) -> dict[str, Any]:
    """The download once libtorrent has taken it up after a restart (the first moments of
    which are test_download_resumes_where_it_was_after_a_clean_restart's concern)."""

    def loaded() -> dict[str, Any] | None:
        info = get(client, task_id)
        return info if info["status"] not in ("queued", "checking") else None

    return wait_for(loaded, f"{task_id} to be loaded")


def wait_completed(client: RawClient, task_id: str) -> dict[str, Any]:
    """The `download.completed` event of `task_id` on a subscribed connection."""
    deadline = time.monotonic() + DEADLINE
    while True:
        event = client.next_event("download.completed", timeout=deadline - time.monotonic())
        if event["task_id"] == task_id:
            return event


# --- restarts -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_download_resumes_where_it_was_after_a_clean_restart(
    daemons: Daemons, library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    daemon = daemons.start()
    with daemon.client() as client:
        add_from(client, "r1", slow_payload, slow_seeder)
        at_stop = wait_progress(client, "r1", lambda p: p >= 0.3, "30 %")
    assert at_stop["progress"] <= 0.6
    assert daemons.stop(daemon) == 0

    saved = resume_progress(library.torrents_dir / "r1.fastresume")
    assert saved >= at_stop["progress"] - IN_FLIGHT
    # The state file has the progress too: a bot listing while the worker restarts sees it.
    assert state_downloads(library)["r1"]["progress"] >= at_stop["progress"] - IN_FLIGHT

    daemon = daemons.start()
    with daemon.client() as client:
        # At once, even while libtorrent still loads the resume data.
        (first,) = client.call("list")["downloads"]
        assert first["task_id"] == "r1"
        assert first["progress"] >= saved - 0.01, first
        assert first["status"] in ("queued", "checking", "downloading"), first
        client.call("subscribe")
        set_upload_rate(slow_seeder, 0)
        completed = wait_completed(client, "r1")
        assert get(client, "r1")["status"] == "completed"
    assert completed["info_hash"] == slow_payload.info_hash
    assert library.hashes_match(slow_payload)


@pytest.mark.timeout(60)
def test_three_downloads_all_resume_and_complete_after_a_restart(
    daemons: Daemons, library: Library, tmp_path: Path
) -> None:
    payloads = [
        make_payload(tmp_path / "seeds", f"Show {n}", {f"e{n}.mkv": 2 * MiB}, piece_size=32 * 1024)
        for n in range(3)
    ]
    task_ids = [f"m{n}" for n in range(3)]
    with seeding(*payloads, upload_rate_limit=SLOW_RATE) as seeder:
        daemon = daemons.start()
        with daemon.client() as client:
            for task_id, payload in zip(task_ids, payloads, strict=True):
                add_from(client, task_id, payload, seeder)

            def all_part_way() -> dict[str, dict[str, Any]] | None:
                infos = listed(client)
                progress = [infos[task_id]["progress"] for task_id in task_ids]
                return infos if all(p >= 0.1 for p in progress) else None

            before = wait_for(all_part_way, "every download past 10 %")
        assert all(info["status"] != "completed" for info in before.values()), before

        daemon = daemons.restart(daemon)
        with daemon.client() as client:
            assert client.call("stats")["resumed_at_start"] == 3
            after = {task_id: wait_loaded(client, task_id) for task_id in task_ids}
            for task_id in task_ids:
                assert after[task_id]["progress"] >= before[task_id]["progress"] - 4 / 64
            client.call("subscribe")
            set_upload_rate(seeder, 0)
            completed = {client.next_event("download.completed")["task_id"] for _ in task_ids}
    assert completed == set(task_ids)
    for payload in payloads:
        assert library.hashes_match(payload)


@pytest.mark.timeout(60)
def test_paused_download_stays_paused_after_a_restart_and_resumes(
    daemons: Daemons, library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    daemon = daemons.start()
    with daemon.client() as client:
        add_from(client, "p1", slow_payload, slow_seeder)
        wait_progress(client, "p1", lambda p: p >= 0.2, "20 %")
        paused = client.call("pause", task_id="p1")
    assert paused["status"] == "paused"

    daemon = daemons.restart(daemon)
    with daemon.client() as client:
        assert get(client, "p1")["status"] == "paused"
        assert state_downloads(library)["p1"]["status"] == "paused"
        after = wait_progress(
            client, "p1", lambda p: p >= paused["progress"] - IN_FLIGHT, "its progress at the pause"
        )
        assert after["status"] == "paused"
        # libtorrent holds it paused: progress events (sent only for downloads that are not
        # paused) keep coming for a download that is running, and never for this one.
        control = client.call("add", magnet=random_magnet())["task_id"]
        client.call("subscribe", progress_interval=0.05)
        seen: list[str] = []
        while seen.count(control) < 6:
            seen.append(client.next_event("download.progress")["task_id"])
        assert "p1" not in seen
        assert get(client, "p1")["downloaded_bytes"] == after["downloaded_bytes"]

        resumed = client.call("resume", task_id="p1")
        assert resumed["status"] != "paused"
        set_upload_rate(slow_seeder, 0)
        wait_completed(client, "p1")
    assert library.hashes_match(slow_payload)


@pytest.mark.timeout(60)
def test_completed_download_is_not_resumed_and_is_offered_until_acked(
    daemons: Daemons, library: Library, payload: Payload, seeder: Seeder
) -> None:
    daemon = daemons.start()
    with daemon.client() as client:
        client.call("subscribe")
        add_from(client, "c1", payload, seeder)
        wait_completed(client, "c1")

    daemon = daemons.restart(daemon)
    with daemon.client() as client:
        stats = client.call("stats")
        assert stats["resumed_at_start"] == 0  # not put back into libtorrent
        assert stats["downloads"] == {"completed": 1}
        info = get(client, "c1")
        assert info["status"] == "completed"
        assert info["progress"] == 1.0
        assert info["completed_at"] is not None
        assert state_downloads(library)["c1"]["status"] == "completed"
        for _ in range(2):  # every subscriber is offered it, as long as it is not acked
            with daemon.client() as subscriber:
                subscriber.call("subscribe")
                assert wait_completed(subscriber, "c1")["completed_at"] == info["completed_at"]
        client.call("ack", task_id="c1")
        assert first_event_after_subscribing(daemon)["event"] == "download.added"
        assert "c1" not in state_downloads(library)
    assert library.hashes_match(payload)  # ack forgets the download, not its files


@pytest.mark.timeout(30)
def test_cancelled_download_is_gone_after_a_restart(
    daemons: Daemons, library: Library, payload: Payload
) -> None:
    daemon = daemons.start()
    with daemon.client() as client:
        client.call("add", task_id="x1", torrent_b64=b64(payload))
        client.call("add", task_id="keep", magnet=random_magnet())
        assert (library.torrents_dir / "x1.torrent").exists()
        client.call("cancel", task_id="x1")
    daemon = daemons.restart(daemon, kill=True)  # a cancel that was answered is on disk
    with daemon.client() as client:
        assert set(listed(client)) == {"keep"}
        assert client.call("stats")["resumed_at_start"] == 1
        reply = client.request("get", task_id="x1")
    assert reply["error"]["code"] == "not_found"
    assert set(state_downloads(library)) == {"keep"}
    assert not (library.torrents_dir / "x1.torrent").exists()


@pytest.mark.timeout(30)
def test_corrupt_state_file_is_kept_aside_and_the_daemon_starts(
    daemons: Daemons, library: Library, payload: Payload, seeder: Seeder
) -> None:
    garbage = b'{"version": 1, "downloads": {"t\x00\xff' + os.urandom(64)
    library.state_dir.mkdir(parents=True)
    (library.state_dir / "downloads.json").write_bytes(garbage)

    daemon = daemons.start()
    (kept,) = library.state_dir.glob("downloads.json.corrupt-*")
    assert re.fullmatch(r"downloads\.json\.corrupt-\d{8}T\d{6}Z", kept.name), kept.name
    assert kept.read_bytes() == garbage
    with daemon.client() as client:
        assert listed(client) == {}
        client.call("subscribe")
        add_from(client, "n1", payload, seeder)
        assert set(state_downloads(library)) == {"n1"}
        wait_completed(client, "n1")
    assert library.hashes_match(payload)
    assert kept.read_bytes() == garbage


@pytest.mark.timeout(60)
def test_restart_uses_fast_resume_data_without_checking_the_files(
    daemons: Daemons, library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    daemon = daemons.start()
    with daemon.client() as client:
        add_from(client, "f1", slow_payload, slow_seeder)
        at_stop = wait_progress(client, "f1", lambda p: p >= 0.45, "about 50 %")
    assert daemons.stop(daemon) == 0

    resume_file = library.torrents_dir / "f1.fastresume"
    saved = resume_progress(resume_file)
    assert saved >= at_stop["progress"] - IN_FLIGHT
    # Change a byte of a piece that the resume data says is downloaded: a check of the files
    # would find that piece bad and download it again; fast resume trusts the resume data.
    have_pieces = lt.read_resume_data(resume_file.read_bytes()).have_pieces
    have = [index for index, had in enumerate(have_pieces) if had]
    piece = have[len(have) // 2]
    data_file = library.download_dir / "Slow" / "big.bin"
    offset = piece * SLOW_PIECE + 100
    with data_file.open("r+b") as file:
        file.seek(offset)
        original = file.read(1)
        file.seek(offset)
        file.write(bytes([original[0] ^ 0xFF]))

    daemon = daemons.start()
    with daemon.client() as client:
        first = wait_loaded(client, "f1")
        assert first["progress"] >= saved - 0.01, first
        client.call("subscribe")
        set_upload_rate(slow_seeder, 0)
        wait_completed(client, "f1")
    assert not library.hashes_match(slow_payload)  # the changed byte is still changed
    with data_file.open("r+b") as file:
        file.seek(offset)
        file.write(original)
    assert library.hashes_match(slow_payload)  # and every other byte is right


@pytest.mark.timeout(60)
def test_killed_daemon_resumes_from_periodic_resume_data_and_keeps_the_completion(
    saving_daemons: Daemons, library: Library, slow_payload: Payload, slow_seeder: Seeder
) -> None:
    daemons = saving_daemons
    resume_file = library.torrents_dir / "k1.fastresume"
    daemon = daemons.start()
    with daemon.client() as client:
        add_from(client, "k1", slow_payload, slow_seeder)

        def saved_part_way() -> dict[str, Any] | None:
            info = get(client, "k1")
            if (
                resume_file.exists()
                and resume_progress(resume_file) >= 0.25
                and state_downloads(library)["k1"]["progress"] >= 0.2
            ):
                return info
            return None

        at_kill = wait_for(saved_part_way, "resume data and saved progress past 20 %")
    assert at_kill["progress"] <= 0.7
    saved = resume_progress(resume_file)
    daemons.kill(daemon)
    saved_in_state = state_downloads(library)["k1"]["progress"]

    # No one is subscribed while it completes.
    daemon = daemons.start()
    with daemon.client() as client:
        # From READY on, never less than the saved progress (not libtorrent's 0 while loading).
        assert get(client, "k1")["progress"] >= saved_in_state
        first = wait_loaded(client, "k1")
        assert first["progress"] >= saved - 0.01, first
        set_upload_rate(slow_seeder, 0)
        wait_for(
            lambda: (
                get(client, "k1")["status"] == "completed"
                and state_downloads(library)["k1"]["status"] == "completed"
            ),
            "k1 completed, in the state file too",
        )

    # Offered on the next subscribe, and again after a crash, until acked.
    with daemon.client() as client:
        client.call("subscribe")
        completed_at = wait_completed(client, "k1")["completed_at"]
    daemon = daemons.restart(daemon, kill=True)
    with daemon.client() as client:
        client.call("subscribe")
        assert wait_completed(client, "k1")["completed_at"] == completed_at
        client.call("ack", task_id="k1")
    daemon = daemons.restart(daemon, kill=True)  # the ack was answered: it is on disk
    assert first_event_after_subscribing(daemon)["event"] == "download.added"
    with daemon.client() as client:
        assert "k1" not in listed(client)
    assert "k1" not in state_downloads(library)
    assert library.hashes_match(slow_payload)  # the files stay


@pytest.mark.timeout(30)
def test_killed_worker_is_replaced_while_the_daemon_answers_every_ping(
    daemons: Daemons,
) -> None:
    daemon = daemons.start()
    old_worker = worker_pid(daemon)
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def ping_all_along() -> None:
        try:
            with daemon.client() as pinger:
                while not done.is_set():
                    answers.append(pinger.request("ping"))
        except BaseException as exc:
            errors.append(exc)

    pinging = threading.Thread(target=ping_all_along)
    pinging.start()
    try:
        with daemon.client() as client:
            wait_for(lambda: len(answers) >= 10 or errors, "pings before the kill")
            os.kill(old_worker, signal.SIGKILL)
            at_kill = len(answers)
            wait_for(lambda: client.call("stats")["worker_restarts"] == 1, "a worker restart")
            # The new worker serves: an add waits for it, and the live state comes from it.
            task_id = client.call("add", magnet=random_magnet())["task_id"]
            wait_for(
                lambda: get(client, task_id)["status"] == "fetching_metadata",
                "the new worker to fetch metadata",
            )
            at_replaced = len(answers)
            new_worker = worker_pid(daemon)
            wait_for(lambda: len(answers) >= at_replaced + 10 or errors, "pings after it")
            assert client.call("stats")["worker_restarts"] == 1
    finally:
        done.set()
        pinging.join(DEADLINE)
    assert not errors, errors
    assert new_worker != old_worker
    assert not process_alive(old_worker)
    assert at_replaced - at_kill >= 10, "few pings were sent while the worker was replaced"
    assert all(answer["ok"] and answer["result"]["ready"] for answer in answers), [
        answer for answer in answers if not answer["ok"]
    ]
    daemons.kill(daemon)  # and its worker exits with it: no orphan is left
    assert not process_alive(new_worker)


# --- durability through the socket ----------------------------------------------------------------


@dataclass
class Acknowledged:
    """The task ids whose `add` got its `ok`, shared by the clients adding them."""

    ids: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    numbers: Iterator[int] = field(default_factory=itertools.count)

    def add_until_the_daemon_dies(self, daemon: Daemon) -> None:
        """One client: adds magnets, one at a time, until its connection breaks."""
        try:
            with daemon.client() as client:
                while True:
                    with self.changed:
                        task_id = f"d{next(self.numbers)}"
                    reply = client.request("add", task_id=task_id, magnet=random_magnet())
                    assert reply["ok"], reply
                    with self.changed:
                        self.ids.add(task_id)
                        self.changed.notify_all()
        except ConnectionError:
            return  # killed: an add without its `ok` may or may not have been kept
        except BaseException as exc:
            with self.changed:
                self.errors.append(exc)
                self.changed.notify_all()

    def wait_for_count(self, count: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: len(self.ids) >= count or self.errors, DEADLINE)
            assert not self.errors, self.errors
            assert len(self.ids) >= count, f"only {len(self.ids)} adds answered"


@pytest.mark.timeout(60)
def test_every_acknowledged_add_survives_sigkill_at_random_moments(
    daemons: Daemons, library: Library
) -> None:
    kills = 20
    rng = random.Random()
    acknowledged = Acknowledged()
    started = time.monotonic()
    daemon = daemons.start()
    for _ in range(kills):
        with daemon.client() as client:
            missing = acknowledged.ids - set(listed(client))
        assert not missing, f"acknowledged adds lost: {sorted(missing)}"
        if acknowledged.ids:
            assert not acknowledged.ids - set(state_downloads(library))

        # Four clients add at once; the kill comes after a random number of answers, so it
        # meets adds at every stage: read, checked, being written, written but not answered.
        clients = [
            threading.Thread(target=acknowledged.add_until_the_daemon_dies, args=(daemon,))
            for _ in range(4)
        ]
        for thread in clients:
            thread.start()
        acknowledged.wait_for_count(len(acknowledged.ids) + rng.randint(1, 25))
        daemons.kill(daemon)
        for thread in clients:
            thread.join(DEADLINE)
            assert not thread.is_alive()
        assert not acknowledged.errors, acknowledged.errors
        daemon = daemons.start()

    with daemon.client() as client:
        missing = acknowledged.ids - set(listed(client))
    assert not missing, f"acknowledged adds lost: {sorted(missing)}"
    assert not acknowledged.ids - set(state_downloads(library))
    assert len(acknowledged.ids) >= kills
    assert time.monotonic() - started < 45


# --- starting -------------------------------------------------------------------------------------


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=environment,
        check=False,
    )


@pytest.mark.timeout(30)
def test_second_daemon_on_the_same_library_exits_3_naming_the_lock(
    daemons: Daemons, library: Library
) -> None:
    daemon = daemons.start()
    second = serve(daemons.config)
    assert second.returncode == 3, second.stderr
    assert str(library.state_dir / "downloads.json.lock") in second.stderr
    with daemon.client() as client:  # the first one is untouched, its socket too
        assert client.call("ping")["ready"] is True


@pytest.mark.timeout(30)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, library: Library) -> None:
    bad_value = write_config(tmp_path / "a", library.root, resume_save_interval="soon")
    result = serve(bad_value)
    assert result.returncode == 2, result.stderr
    assert "resume_save_interval" in result.stderr

    bad_setting = write_config(tmp_path / "b", library.root, libtorrent={"no_such_setting": 1})
    result = serve(bad_setting)
    assert result.returncode == 2, result.stderr
    # Said once, by `serve`: no log line of the failed actor before it.
    assert [line for line in result.stderr.splitlines() if "no_such_setting" in line] == [
        "dlkeeper: config error: libtorrent.no_such_setting: unknown libtorrent setting"
    ]


# --- systemd --------------------------------------------------------------------------------------


def read_notices(
    daemon: Daemon, until: Callable[[list[tuple[float, str]]], bool], timeout: float = DEADLINE
) -> list[tuple[float, str]]:
    """The daemon's sd_notify messages with their arrival times, read until `until` holds of
    them (it is asked after each one, and at least every 0.05 s)."""
    received: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while not until(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"sd_notify messages so far: {received}")
        daemon.notify.settimeout(min(remaining, 0.05))
        try:
            message = daemon.notify.recv(4096).decode()
        except TimeoutError:
            continue
        received.append((time.monotonic(), message))
    return received


@pytest.mark.timeout(60)
def test_systemd_hears_ready_watchdog_while_healthy_and_stopping(daemons: Daemons) -> None:
    daemon = daemons.start(env={"WATCHDOG_USEC": "400000"})  # WATCHDOG=1 every 0.2 s
    assert daemon.notices == ["READY=1"]
    with daemon.client() as client:  # ready means serving
        assert client.call("ping")["ready"] is True

    healthy = read_notices(daemon, lambda got: len(got) >= 8)
    assert {message for _, message in healthy} == {"WATCHDOG=1"}
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(healthy)]
    assert 0.1 <= sorted(gaps)[len(gaps) // 2] <= 0.4, gaps
    # Healthy from READY on: no false alarm before the first heartbeat of the new worker.
    assert "not petting" not in daemon.log.read_text()

    # A hung worker: the daemon pings it every second and replaces it when a ping is 3 s
    # unanswered (actors/session.py); it stops petting once the last answer is 2.5 s old
    # (supervisor/app.py), so not while it hangs, and again once a new worker answers.
    hung = worker_pid(daemon)
    os.kill(hung, signal.SIGSTOP)
    hung_at = time.monotonic()
    replaced_at: list[float] = []

    def petted_after_the_replacement(got: list[tuple[float, str]]) -> bool:
        if not replaced_at and not process_alive(hung):
            replaced_at.append(time.monotonic())
        return bool(replaced_at) and sum(1 for at, _ in got if at > replaced_at[0]) >= 3

    try:
        during = read_notices(daemon, petted_after_the_replacement)
    finally:
        if process_alive(hung):
            os.kill(hung, signal.SIGKILL)
    while_hung = [at - hung_at for at, _ in during if hung_at + 2.8 < at < replaced_at[0]]
    assert not while_hung, f"petted {while_hung} s after the worker hung"
    times = [hung_at] + [at for at, _ in during]
    longest = max(later - earlier for earlier, later in itertools.pairwise(times))
    assert longest >= 1.5, f"the watchdog was petted all along: {during}"
    with daemon.client() as client:
        assert client.call("stats")["worker_restarts"] == 1

    assert daemons.stop(daemon) == 0
    rest = read_notices(daemon, lambda got: "STOPPING=1" in [message for _, message in got])
    assert "READY=1" not in [message for _, message in rest]
