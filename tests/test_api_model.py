"""The message API against a model of its contract (CONTRACT section 2): a hypothesis state
machine drives a real daemon with adds (torrent_b64 or torrent_path, some paused, with or without
file priorities), pauses, resumes, set_files, cancels, acks, retries, refused requests, clean
restarts and SIGKILLs, in random order, and checks each reply against what the model expects. The
model is a dict task_id -> status and priorities; its rules are the contract's: an add of a
task_id that exists with the same torrent returns it unchanged, with another torrent is
`duplicate`, and so is a torrent held under another task_id; pause, resume and set_files of a
completed download are `bad_request`, an ack of one that is not completed too, and a retry of
any (none fails here); an unknown task_id is `not_found`.

After every step: downloads.json holds exactly the model (every change answered `ok`, none
lost; after a SIGKILL too), `list` and the file agree (same task_ids; a saved paused is listed
paused, a saved queued or downloading is listed queued, checking or downloading), every kept
.torrent is a saved download's, and every refusal carried a contract code (never `internal`).
After every restart, libtorrent is probed through the API: a torrent the model holds is refused
`duplicate` under a new task_id, and one it does not hold (cancelled, acked) adds again, which a
torrent libtorrent still held would not ("already in the session").

There is no seeder, so a download never completes unless every one of its files is set to
priority 0: libtorrent then counts it finished (paused or not) within milliseconds, and the model
waits for the completion the daemon saves. That is the model's one way to `completed`, and so to
an `ack` that is not refused. `scripts/soak_model.py` runs the same machine for longer.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import StopTest
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from actors.layout import Layout
from tests.api import b64
from tests.daemons import CONTRACT_ERROR_CODES, DEADLINE, Daemon, RawClient, layout_of, write_config
from tests.torrents import Payload, make_payload

pytestmark = pytest.mark.timeout(180)

CODES = CONTRACT_ERROR_CODES
ACTIVE_LISTED = frozenset({"queued", "checking", "downloading"})  # a saved queued/downloading
DEFAULT_PRIORITY = 4  # libtorrent's, which `get` shows for a download added without priorities
# Files per payload: 1 to 3 files, a few KiB each (a single-file torrent and a folder both).
PAYLOAD_FILES: tuple[dict[str, int], ...] = (
    {"only.bin": 24_000},
    {"a.bin": 20_000, "sub/b.bin": 9_000},
    {"a.bin": 7_000, "b.bin": 30_000, "c/d.bin": 5_000},
    {"x.mkv": 40_000, "x.srt": 1_200},
    {"single.iso": 17_000},
)
TASK_IDS = ("t0", "t1", "t2", "t3", "t4", "t5")
MADE = "<made>"  # a target meaning: a task_id the daemon made for an add that named none
NEVER_ADDED = "never-added"
TARGETS = st.sampled_from((*TASK_IDS, MADE))
PRIORITY = st.integers(0, 7)


def make_payloads(directory: Path) -> list[Payload]:
    """The machine's torrents, made once per run (not per example): random bytes, so their
    info hashes are nobody else's."""
    return [
        make_payload(directory / "seed", f"model-{number}", files)
        for number, files in enumerate(PAYLOAD_FILES)
    ]


@dataclass
class Expected:
    """What the contract says one download is now."""

    payload: int
    status: str  # "active" (saved queued or downloading), "paused" or "completed"
    priorities: tuple[int, ...] | None  # None: added without, never set


@dataclass
class Tally:
    """What runs of the machine did, for the soak script's report."""

    examples: int = 0
    steps: int = 0
    restarts: int = 0
    kills: int = 0
    completions: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (a daemon's: its libtorrent worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(ppid) == pid and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"process {pid} outlived its daemon by {timeout:g} s")
            time.sleep(0.01)  # polling a process's exit, under a deadline


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@dataclass(frozen=True)
class Site:
    """A library of the machine's own, its config, and a short folder for its socket."""

    root: Path
    socket_dir: Path
    config: Path
    layout: Layout

    @classmethod
    def make(cls, root: Path) -> Site:
        library = root / "library"
        (library / "downloads").mkdir(parents=True)
        socket_dir = Path(tempfile.mkdtemp(prefix="dkmodel"))
        config = write_config(
            root / "etc",
            library,
            socket_path=socket_dir / "api.sock",
            resume_save_interval=1,  # periodic resume saves going on under the requests
        )
        return cls(root, socket_dir, config, layout_of(config))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def stop(daemon: Daemon, client: RawClient, *, kill: bool) -> None:
    """SIGKILL or SIGTERM (which must exit 0); returns once the daemon and its libtorrent
    worker are gone."""
    client.close()
    workers = children_of(daemon.process.pid) if daemon.process.poll() is None else []
    try:
        if kill:
            daemon.kill()
        else:
            assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
        wait_gone(workers)
    finally:
        daemon.close()


def discard(site: Site, daemon: Daemon, client: RawClient) -> None:
    stop(daemon, client, kill=True)
    site.remove()


class ApiModel(RuleBasedStateMachine):
    """One example: a daemon on an empty library, driven by the rules below.

    Configured by `configured()`: where libraries go, the payloads, and how many restarts an
    example may have (the expensive step: about a second each). A daemon whose example passed
    is emptied (every download cancelled, through the API) and serves the next example, so
    that an example costs its restarts only; after any failure every example gets a new daemon
    on a new library, so that shrinking replays start from nothing. A failed example's library
    and daemon log are left under `workdir`.
    """

    workdir: ClassVar[Path]
    payloads: ClassVar[list[Payload]]
    max_restarts: ClassVar[int] = 1
    reuse_daemon: ClassVar[bool] = True
    tally: ClassVar[Tally] = Tally()
    _spare: ClassVar[tuple[Site, Daemon, RawClient] | None] = None
    _numbers: ClassVar[Iterator[int]] = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, Expected] = {}
        self.made: list[str] = []
        self.restarts = 0
        self.probes = itertools.count()
        self.torrent_files: dict[int, Path] = {}
        self.served: tuple[Daemon, RawClient] | None = None  # started by the first request
        spare, type(self)._spare = type(self)._spare, None
        if spare is not None and self.reuse_daemon:
            self.site, daemon, client = spare
            self.served = daemon, client
        else:
            if spare is not None:
                discard(*spare)
            self.site = Site.make(self.workdir / f"library-{next(self._numbers)}")
        self.tally.examples += 1

    @property
    def layout(self) -> Layout:
        return self.site.layout

    def teardown(self) -> None:
        failure = sys.exc_info()[1]  # StopTest: hypothesis cut the example short, no failure
        failed = failure is not None and not isinstance(failure, StopTest)
        keep = False
        try:
            if not failed and self.served is not None and self.reuse_daemon:
                self.empty_library()
                keep = True
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                type(self).reuse_daemon = False
            if keep:
                assert self.served is not None
                type(self)._spare = (self.site, *self.served)
            else:
                if self.served is not None:
                    self.stop_daemon(kill=True)
                if not failed:
                    self.site.remove()

    def empty_library(self) -> None:
        """Cancels every download, leaving the daemon as a new one on an empty library."""
        for task_id in list(self.model):
            assert self.ok("cancel", task_id=task_id) == {}
            del self.model[task_id]
        self.kept_torrents_are_the_saved_downloads()
        assert self.saved() == {} and self.ok("list") == {"downloads": []}

    @classmethod
    def release(cls) -> None:
        """Stops the daemon kept for the next example; call it when the run is over."""
        spare, cls._spare = cls._spare, None
        if spare is not None:
            discard(*spare)

    # --- talking to the daemon -------------------------------------------------------------

    def connection(self) -> RawClient:
        if self.served is None:
            daemon = Daemon(self.site.config)
            try:
                daemon.wait_ready()
            except BaseException:
                daemon.close()  # (its log stays: a failed example's library is kept)
                raise
            self.served = daemon, daemon.client()
        return self.served[1]

    def stop_daemon(self, *, kill: bool) -> None:
        """SIGKILL or SIGTERM; returns once the daemon and its libtorrent worker are gone."""
        assert self.served is not None
        daemon, client = self.served
        self.served = None
        stop(daemon, client, kill=kill)

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        """A request's reply; a refusal must carry one of the contract's codes, never
        `internal`."""
        reply = self.connection().request(op, **params)
        assert set(reply) in ({"id", "ok", "result"}, {"id", "ok", "error"}), reply
        if not reply["ok"]:
            error = reply["error"]
            assert error["code"] in CODES, reply
            assert error["code"] != "internal", reply
            assert isinstance(error["message"], str) and error["message"], reply
            self.tally.codes[error["code"]] += 1
        return reply

    def ok(self, op: str, **params: Any) -> Any:
        reply = self.request(op, **params)
        assert reply["ok"], f"{op} {params.get('task_id')}: expected ok, got {reply}"
        return reply["result"]

    def refused(self, code: str, op: str, **params: Any) -> dict[str, Any]:
        reply = self.request(op, **params)
        assert not reply["ok"] and reply["error"]["code"] == code, (
            f"{op} {params.get('task_id')}: expected {code}, got {reply}"
        )
        error: dict[str, Any] = reply["error"]
        return error

    def count(self, rule_name: str) -> None:
        self.tally.steps += 1
        self.tally.rules[rule_name] += 1

    # --- the model's reading of a download -------------------------------------------------

    def target(self, name: str) -> str:
        """A task_id to send: `name`, or for MADE one the daemon made (one still held first)."""
        if name != MADE:
            return name
        held = [task_id for task_id in self.made if task_id in self.model]
        return held[0] if held else (self.made[-1] if self.made else NEVER_ADDED)

    def holder(self, payload: int) -> str | None:
        for task_id, expected in self.model.items():
            if expected.payload == payload:
                return task_id
        return None

    def files_of(self, payload: int) -> int:
        return len(PAYLOAD_FILES[payload])

    def expected_priorities(self, expected: Expected) -> list[int]:
        if expected.priorities is None:
            return [DEFAULT_PRIORITY] * self.files_of(expected.payload)
        return list(expected.priorities)

    def check_info(self, info: dict[str, Any], task_id: str) -> None:
        """A DownloadInfo (of `get`, `list`, `pause`, ...) against the model."""
        expected = self.model[task_id]
        payload = self.payloads[expected.payload]
        assert info["task_id"] == task_id, info
        assert info["info_hash"] == payload.info_hash, info
        assert info["name"] == payload.name, info
        assert status_agrees(expected.status, info["status"]), (task_id, expected, info)
        files = info["files"]
        assert [f["priority"] for f in files] == self.expected_priorities(expected), (
            task_id,
            expected,
            files,
        )
        for entry in files:
            path = Path(entry["path"])
            assert not path.is_absolute() and ".." not in path.parts, entry
        if expected.status == "completed":
            assert info["progress"] == 1.0 and info["completed_at"] is not None, info

    def saved(self) -> dict[str, dict[str, Any]]:
        if not self.layout.state_file.exists():
            return {}
        downloads: dict[str, dict[str, Any]] = json.loads(self.layout.state_file.read_bytes())[
            "downloads"
        ]
        return downloads

    def check_saved(self) -> dict[str, dict[str, Any]]:
        """downloads.json holds every change answered `ok`, and nothing else."""
        saved = self.saved()
        assert set(saved) == set(self.model), (sorted(saved), sorted(self.model))
        for task_id, record in saved.items():
            expected = self.model[task_id]
            assert record["info_hash"] == self.payloads[expected.payload].info_hash, record
            assert saved_agrees(expected.status, record["status"]), (expected, record)
            assert record["file_priorities"] == list(expected.priorities or ()), (
                expected,
                record,
            )
            if expected.status == "completed":
                assert record["completed_at"] is not None, record
        return saved

    def wait_completed(self, task_id: str) -> None:
        """Every file at priority 0: libtorrent finishes it, and the daemon saves `completed`.
        Waits for `get` to say so: the file says it a moment sooner (the daemon answers from
        what it has written, once the write has returned)."""
        deadline = time.monotonic() + DEADLINE
        while self.ok("get", task_id=task_id)["status"] != "completed":
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} wants no file, yet never completed")
            time.sleep(0.01)  # polling, under a deadline
        assert self.saved()[task_id]["status"] == "completed"
        self.model[task_id].status = "completed"
        self.tally.completions += 1

    # --- rules -----------------------------------------------------------------------------

    @initialize(paused=st.lists(st.booleans(), min_size=2, max_size=2))
    def some_downloads(self, paused: list[bool]) -> None:
        """Two downloads to start with, so that no example is only refusals."""
        self.count("some_downloads")
        for number, held in enumerate(paused):
            task_id = TASK_IDS[number]
            payload = self.payloads[number]
            result = self.ok("add", torrent_b64=b64(payload.torrent), task_id=task_id, paused=held)
            assert result["status"] == ("paused" if held else "queued"), result
            self.model[task_id] = Expected(number, "paused" if held else "active", None)

    @rule(
        task=st.sampled_from(TASK_IDS) | st.none(),
        payload=st.integers(0, len(PAYLOAD_FILES) - 1),
        paused=st.booleans(),
        by_path=st.sampled_from([False, False, False, True]),
        data=st.data(),
    )
    def add(
        self, task: str | None, payload: int, paused: bool, by_path: bool, data: st.DataObject
    ) -> None:
        self.count("add")
        files = self.files_of(payload)
        kind = data.draw(
            st.sampled_from(["default", "given", "given", "none_wanted", "wrong_count"]),
            label="priorities",
        )
        priorities: list[int] | None = None
        if kind == "given":
            priorities = data.draw(st.lists(PRIORITY, min_size=files, max_size=files))
        elif kind == "none_wanted":
            priorities = [0] * files
        elif kind == "wrong_count":  # or none at all: [] is taken as not given
            priorities = data.draw(st.lists(PRIORITY, max_size=4).filter(lambda p: len(p) != files))
        params: dict[str, Any] = {"paused": paused}
        if by_path:
            params["torrent_path"] = str(self.torrent_file(payload))
        else:
            params["torrent_b64"] = b64(self.payloads[payload].torrent)
        if task is not None:
            params["task_id"] = task
        if priorities is not None:
            params["file_priorities"] = priorities
        info_hash = self.payloads[payload].info_hash

        # In the order the contract's checks come: the request itself, then the task_id, then
        # the torrent under another task_id. An empty list is taken as "not given".
        if priorities and len(priorities) != files:
            self.refused("bad_request", "add", **params)
            return
        existing = self.model.get(task) if task is not None else None
        if existing is not None:
            if existing.payload != payload:
                assert self.refused("duplicate", "add", **params)["task_id"] == task
                return
            result = self.ok("add", **params)  # a retried add: the existing download, unchanged
            assert result["task_id"] == task and result["info_hash"] == info_hash, result
            assert status_agrees(existing.status, result["status"]), (existing, result)
            return
        owner = self.holder(payload)
        if owner is not None:
            assert self.refused("duplicate", "add", **params)["task_id"] == owner
            return
        result = self.ok("add", **params)
        task_id = result["task_id"]
        assert task is None or task_id == task, result
        assert result["info_hash"] == info_hash, result
        assert result["status"] == ("paused" if paused else "queued"), result
        if task is None:
            assert task_id not in self.model, result
            self.made.append(task_id)
        self.model[task_id] = Expected(
            payload, "paused" if paused else "active", tuple(priorities) if priorities else None
        )
        if priorities and not any(priorities):
            self.wait_completed(task_id)

    def torrent_file(self, payload: int) -> Path:
        """The payload's .torrent as a file, for an add by `torrent_path`."""
        if payload not in self.torrent_files:
            path = self.site.root / "torrents" / f"{payload}.torrent"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.payloads[payload].torrent)
            self.torrent_files[payload] = path
        return self.torrent_files[payload]

    @rule(target_name=TARGETS)
    def pause(self, target_name: str) -> None:
        self.count("pause")
        task_id = self.target(target_name)
        expected = self.model.get(task_id)
        if expected is None:
            self.refused("not_found", "pause", task_id=task_id)
        elif expected.status == "completed":
            self.refused("bad_request", "pause", task_id=task_id)
        else:
            info = self.ok("pause", task_id=task_id)
            expected.status = "paused"
            self.check_info(info, task_id)
            assert info["status"] == "paused", info

    @rule(target_name=TARGETS)
    def resume(self, target_name: str) -> None:
        self.count("resume")
        task_id = self.target(target_name)
        expected = self.model.get(task_id)
        if expected is None:
            self.refused("not_found", "resume", task_id=task_id)
        elif expected.status == "completed":
            self.refused("bad_request", "resume", task_id=task_id)
        else:
            info = self.ok("resume", task_id=task_id)
            expected.status = "active"
            self.check_info(info, task_id)

    @rule(target_name=TARGETS, data=st.data())
    def set_files(self, target_name: str, data: st.DataObject) -> None:
        self.count("set_files")
        task_id = self.target(target_name)
        expected = self.model.get(task_id)
        files = self.files_of(expected.payload) if expected is not None else 2
        kind = data.draw(
            st.sampled_from(["given", "given", "given", "none_wanted", "wrong_count"]),
            label="priorities",
        )
        if kind == "given":
            priorities = data.draw(st.lists(PRIORITY, min_size=files, max_size=files))
        elif kind == "none_wanted":
            priorities = [0] * files
        else:
            priorities = data.draw(st.lists(PRIORITY, max_size=4).filter(lambda p: len(p) != files))
        params = {"task_id": task_id, "file_priorities": priorities}
        if expected is None:
            self.refused("not_found", "set_files", **params)
        elif expected.status == "completed" or len(priorities) != files:
            self.refused("bad_request", "set_files", **params)
        else:
            info = self.ok("set_files", **params)
            expected.priorities = tuple(priorities)
            assert [f["priority"] for f in info["files"]] == priorities, info
            if any(priorities):
                self.check_info(info, task_id)
            else:
                self.wait_completed(task_id)

    @rule(target_name=TARGETS, delete_files=st.booleans())
    def cancel(self, target_name: str, delete_files: bool) -> None:
        self.count("cancel")
        task_id = self.target(target_name)
        if task_id not in self.model:
            self.refused("not_found", "cancel", task_id=task_id, delete_files=delete_files)
            return
        assert self.ok("cancel", task_id=task_id, delete_files=delete_files) == {}
        del self.model[task_id]

    @rule(target_name=TARGETS)
    def ack(self, target_name: str) -> None:
        self.count("ack")
        task_id = self.target(target_name)
        expected = self.model.get(task_id)
        if expected is None:
            self.refused("not_found", "ack", task_id=task_id)
        elif expected.status != "completed":
            self.refused("bad_request", "ack", task_id=task_id)
        else:
            assert self.ok("ack", task_id=task_id) == {}
            del self.model[task_id]

    @rule(target_name=TARGETS)
    def retry(self, target_name: str) -> None:
        # No download of the model ever fails (no fault is made here): a retry is always
        # refused, and changes nothing (the invariants check the state file).
        self.count("retry")
        task_id = self.target(target_name)
        code = "not_found" if task_id not in self.model else "bad_request"
        self.refused(code, "retry", task_id=task_id)

    @rule(target_name=TARGETS)
    def get(self, target_name: str) -> None:
        self.count("get")
        task_id = self.target(target_name)
        if task_id not in self.model:
            self.refused("not_found", "get", task_id=task_id)
        else:
            self.check_info(self.ok("get", task_id=task_id), task_id)

    @rule(payload=st.integers(0, len(PAYLOAD_FILES) - 1))
    def probe(self, payload: int) -> None:
        """libtorrent holds exactly the model's torrents, as far as the API shows."""
        self.count("probe")
        self.probe_libtorrent(payload)

    @rule(
        kind=st.sampled_from(
            ["unknown_op", "bad_task_id", "not_base64", "not_a_torrent", "bad_magnet", "outside"]
        )
    )
    def refuse(self, kind: str) -> None:
        """A request the contract refuses changes nothing on disk."""
        self.count("refuse")
        before = self.saved_choices()
        if kind == "unknown_op":
            self.refused("unknown_op", "rename", task_id="t0")
        elif kind == "bad_task_id":
            self.refused("bad_request", "pause", task_id="no spaces/allowed")
        elif kind == "not_base64":
            self.refused("bad_request", "add", torrent_b64="not base64!", task_id="t0")
        elif kind == "not_a_torrent":
            self.refused("invalid_torrent", "add", torrent_b64=b64(b"d4:spam4:eggse"))
        elif kind == "bad_magnet":
            self.refused("invalid_magnet", "add", magnet="magnet:?xt=urn:btih:xyz")
        else:
            self.refused(
                "path_not_allowed",
                "add",
                torrent_b64=b64(self.payloads[0].torrent),
                task_id="t5",
                save_path="/etc",
            )
        assert self.saved_choices() == before, f"a refused {kind} changed the state file"

    def saved_choices(self) -> dict[str, dict[str, Any]]:
        """The state file less what the daemon changes on its own (a queued download becomes
        downloading when libtorrent starts it; the progress of the last resume data)."""
        choices = {}
        for task_id, record in self.saved().items():
            status = "active" if record["status"] in ("queued", "downloading") else record["status"]
            choices[task_id] = {**record, "status": status, "progress": None}
        return choices

    # Two rules, not one with a flag: hypothesis enables or disables each rule per example
    # (swarm testing), and a CI run of a few examples should see both.
    @precondition(lambda self: self.restarts < self.max_restarts)
    @rule()
    def restart(self) -> None:
        """A clean stop (SIGTERM) and a new daemon on the same library."""
        self.start_again(kill=False)

    @precondition(lambda self: self.restarts < self.max_restarts)
    @rule()
    def kill(self) -> None:
        """A SIGKILL of the daemon (its worker exits by itself) and a new daemon."""
        self.start_again(kill=True)

    def start_again(self, *, kill: bool) -> None:
        """After a stop or a kill, nothing that was answered `ok` is lost, and libtorrent is
        replayed to hold exactly the saved torrents."""
        self.count("kill" if kill else "restart")
        self.restarts += 1
        self.connection()
        self.stop_daemon(kill=kill)
        if kill:
            self.tally.kills += 1
        else:
            self.tally.restarts += 1
        self.check_saved()  # what the next daemon starts from
        stats = self.ok("stats")  # (a new daemon)
        replayed = sum(1 for e in self.model.values() if e.status != "completed")
        assert stats["resumed_at_start"] == replayed, (stats, self.model)
        assert stats["resume_failures"] == 0, stats
        assert active_counts(stats["downloads"]) == active_counts(saved_counts(self.saved()))
        for task_id in self.model:
            self.check_info(self.ok("get", task_id=task_id), task_id)
        for payload in range(len(self.payloads)):
            self.probe_libtorrent(payload)

    def probe_libtorrent(self, payload: int) -> None:
        probe_id = f"probe-{next(self.probes)}"
        params = {"torrent_b64": b64(self.payloads[payload].torrent), "task_id": probe_id}
        owner = self.holder(payload)
        if owner is not None:
            assert self.refused("duplicate", "add", **params)["task_id"] == owner
        else:
            # A torrent cancelled or acked is out of libtorrent: it adds again.
            self.ok("add", **params)
            assert self.ok("cancel", task_id=probe_id) == {}

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def state_file_list_and_model_agree(self) -> None:
        if self.served is None:
            return  # nothing asked yet
        saved = self.check_saved()
        listed = {info["task_id"]: info for info in self.ok("list")["downloads"]}
        assert set(listed) == set(saved), (sorted(listed), sorted(saved))
        for task_id, info in listed.items():
            self.check_info(info, task_id)
            assert listed_agrees(saved[task_id]["status"], info["status"]), (saved, info)

    @invariant()
    def kept_torrents_are_the_saved_downloads(self) -> None:
        """Every saved download has its .torrent copy; a cancel or an ack removes it and its
        resume data, so a reused task_id starts afresh."""
        kept: dict[str, set[str]] = {".torrent": set(), ".fastresume": set()}
        torrents = self.layout.torrents_dir
        for path in torrents.iterdir() if torrents.exists() else ():
            if path.suffix in kept:
                kept[path.suffix].add(path.stem)
        assert kept[".torrent"] == set(self.model), (kept, sorted(self.model))
        assert kept[".fastresume"] <= set(self.model), (kept, sorted(self.model))


def status_agrees(expected: str, status: str) -> bool:
    """A status the API shows (`get`, `list`, add's result) for a download the model says is
    `expected`."""
    if expected == "active":
        return status in ACTIVE_LISTED
    return status == expected


def saved_agrees(expected: str, saved: str) -> bool:
    if expected == "active":
        return saved in ("queued", "downloading")
    return saved == expected


def listed_agrees(saved: str, listed: str) -> bool:
    """A saved paused is listed paused; a saved queued/downloading is listed queued, checking
    or downloading; completed and failed as saved."""
    if saved in ("queued", "downloading"):
        return listed in ACTIVE_LISTED
    return listed == saved


def saved_counts(saved: dict[str, dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(record["status"] for record in saved.values()))


def active_counts(counts: dict[str, int]) -> dict[str, int]:
    """Downloads per status, queued and downloading as one: libtorrent starting a queued one
    (the daemon then saves it downloading) may come between two readings."""
    merged: Counter[str] = Counter()
    for status, count in counts.items():
        merged["active" if status in ("queued", "downloading") else status] += count
    return dict(merged)


def configured(
    workdir: Path,
    payloads: list[Payload],
    *,
    max_restarts: int,
    reuse_daemon: bool = True,
    tally: Tally | None = None,
) -> type[ApiModel]:
    """The machine on these payloads, with its libraries under `workdir`; `release()` it
    after the run."""
    attributes = {
        "workdir": workdir,
        "payloads": payloads,
        "max_restarts": max_restarts,
        "reuse_daemon": reuse_daemon,
        "tally": tally or Tally(),
        "_spare": None,
    }
    return type("ApiModelRun", (ApiModel,), attributes)


# The CI run: small and reproducible (derandomized): 20 examples, 8 restarts, about 8 s.
# Restarts cost most (a second each), so at most one per example; `scripts/soak_model.py` runs
# the machine longer, with more. No shrinking: each replay needs a new daemon, and minutes of
# them would outlast the timeout; the failing steps (at most 20) are printed as they ran,
# replayed once on a new daemon.
CI_SETTINGS = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def test_the_api_keeps_to_the_contract_model_across_restarts_and_kills(tmp_path: Path) -> None:
    machine = configured(tmp_path / "examples", make_payloads(tmp_path), max_restarts=1)
    try:
        run_state_machine_as_test(machine, settings=CI_SETTINGS)
    finally:
        machine.release()
    # Derandomized, so the same run every time: one that no longer restarts would test less.
    assert machine.tally.restarts > 0 and machine.tally.kills > 0, machine.tally
