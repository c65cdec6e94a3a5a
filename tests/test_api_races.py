"""Requests in flight that race each other: what was answered `ok` is what libtorrent does."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.api import (
    Library,
    Served,
    b64,
    code_of,
    fixture_fresh,  # noqa: F401 (a fixture)
    line,
    make_library,
    new_id,
    new_payload,
    wait_until,
)
from tests.daemons import Daemon, RawClient, layout_of, running_daemon
from tests.test_stop import children
from tests.torrents import Payload


def pipelined(client: RawClient, *requests: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """Sends every request before reading any reply; the replies by request id."""
    client.send_raw(b"".join(line(request) for request in requests))
    replies: dict[Any, dict[str, Any]] = {}
    while len(replies) < len(requests):
        message = client.read_message()
        if "event" not in message:
            replies[message["id"]] = message
    return replies


def magnet(payload: Payload) -> str:
    return f"magnet:?xt=urn:btih:{payload.info_hash}&dn={payload.name}"


def test_a_cancel_pipelined_behind_its_add_takes_the_torrent_out_of_libtorrent(
    fresh: Served, tmp_path: Path
) -> None:
    # The cancel used to reach the worker while it was still adding: `not_found` there became
    # an `ok`, and the torrent went on downloading with no state entry.
    payloads = [new_payload(tmp_path / f"p{number}") for number in range(30)]
    with fresh.client() as client:
        for number, payload in enumerate(payloads):
            task_id = f"race-{number}"
            replies = pipelined(
                client,
                {"id": "add", "op": "add", "torrent_b64": b64(payload.torrent), "task_id": task_id},
                {"id": "cancel", "op": "cancel", "task_id": task_id},
            )
            assert replies["add"]["ok"], replies
            assert replies["cancel"]["ok"], replies
        assert fresh.library.state() == {}
        # A torrent libtorrent still held would be refused: "already in the session".
        for number, payload in enumerate(payloads):
            again = client.request("add", magnet=magnet(payload), task_id=f"again-{number}")
            assert again["ok"], again


def test_a_pause_pipelined_behind_its_add_is_applied(fresh: Served, tmp_path: Path) -> None:
    payloads = [new_payload(tmp_path / f"p{number}") for number in range(10)]
    with fresh.client() as client:
        for number, payload in enumerate(payloads):
            task_id = f"held-{number}"
            replies = pipelined(
                client,
                {"id": "add", "op": "add", "torrent_b64": b64(payload.torrent), "task_id": task_id},
                {"id": "pause", "op": "pause", "task_id": task_id},
            )
            assert replies["add"]["ok"] and replies["pause"]["ok"], replies
            assert fresh.library.state()[task_id]["status"] == "paused"
    # What libtorrent does shows after a restart too: the replay adds it as saved, and the
    # saved resume data (written on pause) says paused.
    assert fresh.daemon.stop() == 0
    with running_daemon(fresh.library.config) as again, again.client() as client:
        for number in range(10):
            assert client.call("get", task_id=f"held-{number}")["status"] == "paused"


def test_a_cancel_and_a_re_add_of_one_task_id_pipelined_keep_the_new_copy(
    fresh: Served, tmp_path: Path
) -> None:
    # The cancel's cleanup unlinked <task_id>.torrent by name after its removal committed, and
    # could delete the copy the re-add had just written: `failed: cannot be resumed` later.
    old, new = new_payload(tmp_path / "old"), new_payload(tmp_path / "new")
    rounds = 40
    with fresh.client() as client:
        for number in range(rounds):
            task_id = f"reused-{number}"
            assert client.request("add", torrent_b64=b64(old.torrent), task_id=task_id)["ok"]
            replies = pipelined(
                client,
                {"id": "cancel", "op": "cancel", "task_id": task_id},
                {"id": "add", "op": "add", "torrent_b64": b64(new.torrent), "task_id": task_id},
            )
            assert replies["cancel"]["ok"] and replies["add"]["ok"], replies
            assert (fresh.library.torrents / f"{task_id}.torrent").read_bytes() == new.torrent
            assert client.call("cancel", task_id=task_id) == {}
            # Free again for the next round's torrents: every copy is of a live download.
            assert not (fresh.library.torrents / f"{task_id}.torrent").exists()


def test_random_pipelined_changes_leave_the_state_file_list_and_libtorrent_agreeing(
    fresh: Served, tmp_path: Path
) -> None:
    payloads = [new_payload(tmp_path / f"p{number}") for number in range(6)]
    task_ids = [new_id("storm") for _ in payloads]
    chooser = random.Random(20261201)
    clients = [fresh.client() for _ in range(3)]
    try:
        for _ in range(8):
            for client in clients:
                requests: list[dict[str, Any]] = []
                for index in range(12):
                    which = chooser.randrange(len(payloads))
                    op = chooser.choice(["add", "add", "pause", "resume", "set_files", "cancel"])
                    request: dict[str, Any] = {"id": index, "op": op, "task_id": task_ids[which]}
                    if op == "add":
                        request["torrent_b64"] = b64(payloads[which].torrent)
                        request["paused"] = chooser.random() < 0.3
                    elif op == "set_files":
                        request["file_priorities"] = [chooser.choice([0, 1, 4, 7]) for _ in "ab"]
                    requests.append(request)
                replies = pipelined(client, *requests)
                for reply in replies.values():
                    assert reply["ok"] or code_of(reply) in {"not_found", "bad_request"}, reply
    finally:
        for client in clients:
            client.close()
    _assert_agree(fresh.daemon, fresh.library, payloads, task_ids)
    assert fresh.daemon.stop() == 0
    with running_daemon(fresh.library.config) as again:
        _assert_agree(again, fresh.library, payloads, task_ids)


def _assert_agree(
    daemon: Daemon, library: Library, payloads: list[Payload], task_ids: list[str]
) -> None:
    saved = library.state()
    with daemon.client() as client:
        listed = {info["task_id"]: info for info in client.call("list")["downloads"]}
        assert set(listed) == set(saved)
        for task_id, record in saved.items():
            if record["status"] in ("queued", "downloading"):
                assert listed[task_id]["status"] in ("queued", "checking", "downloading")
            else:  # paused, or completed (every file set to priority 0)
                assert listed[task_id]["status"] == record["status"]
        for payload, task_id in zip(payloads, task_ids, strict=True):
            # libtorrent holds exactly the saved torrents: a saved one is a duplicate under
            # another task_id, an unsaved one (a ghost would be "already in the session") adds.
            probe = client.request("add", magnet=magnet(payload), task_id=new_id("probe"))
            if task_id in saved:
                assert code_of(probe) == "duplicate", probe
            else:
                assert probe["ok"], probe
                assert client.call("cancel", task_id=probe["result"]["task_id"]) == {}


STRACE = shutil.which("strace")


@pytest.mark.skipif(STRACE is None, reason="needs strace (.ci/run installs it)")
def test_an_add_whose_client_left_during_a_slow_write_is_still_started(tmp_path: Path) -> None:
    # The state folder's fsync takes 7 s, more than the 5 s the server waits for a request
    # whose client has gone: that request used to be cancelled after its save and before
    # libtorrent got it, so the download stayed `queued` and never ran.
    library = make_library(tmp_path)
    layout = layout_of(library.config)
    layout.state_dir.mkdir(parents=True)
    assert STRACE is not None
    slow_fsync = [STRACE, "-f", "-qq", "-o", "/dev/null", "-P", str(layout.state_dir)]
    slow_fsync += ["-e", "trace=fsync", "-e", "inject=fsync:delay_enter=7000000"]
    daemon = Daemon(library.config, command_prefix=slow_fsync)
    try:
        daemon.wait_ready()
        torrent = new_payload(tmp_path / "p")
        with daemon.client() as client:
            client.send_raw(
                line({"id": 1, "op": "add", "magnet": magnet(torrent), "task_id": "gone"})
            )
            wait_until(lambda: "gone" in library.state() or None, "the add to be saved")
        with daemon.client() as client:

            def live_status() -> str | None:
                reply = client.request("get", task_id="gone")  # not_found until committed
                return reply["result"]["status"] if reply["ok"] else None

            # In libtorrent: its live state, fetching metadata (no peer has it), not `queued`.
            wait_until(
                lambda: live_status() == "fetching_metadata" or None,
                "the saved download to be in libtorrent",
            )
    finally:
        tracee = children(daemon.process.pid)
        daemon.close()  # strace is started with the daemon: its end takes the daemon along
        for pid in tracee:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
