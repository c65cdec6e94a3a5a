"""Stopping the daemon: a clean stop, and a second signal while stopping."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from actors.state import MigrationContext
from actors.statefile import StateStore
from tests.daemons import DEADLINE, Daemon, layout_of, running_daemon, write_config
from tests.records import make_record

pytestmark = pytest.mark.timeout(60)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the daemon's libtorrent worker)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat_file.parent.name))
    return found


def test_clean_stop_exits_0_removes_the_socket_and_keeps_the_state(tmp_path: Path) -> None:
    config = write_config(tmp_path / "etc", tmp_path / "library")
    with running_daemon(config) as daemon:
        with daemon.client() as client:
            client.call("add", magnet="magnet:?xt=urn:btih:" + "12" * 20, task_id="kept")
        (worker,) = children(daemon.process.pid)
        assert daemon.stop() == 0
        daemon.wait_for_notice("STOPPING=1")
        assert not daemon.socket.exists()
        deadline = time.monotonic() + DEADLINE
        while Path(f"/proc/{worker}").exists():  # the worker exits with the daemon
            assert time.monotonic() < deadline, "the worker outlived the daemon"
            time.sleep(0.05)
    state = json.loads(layout_of(config).state_file.read_bytes())
    assert list(state["downloads"]) == ["kept"]


def test_a_second_sigterm_while_stopping_exits_at_once_and_corrupts_nothing(
    tmp_path: Path,
) -> None:
    # A worker that hangs makes the stop wait for its resume data (up to shutdown_timeout).
    config = write_config(tmp_path / "etc", tmp_path / "library", shutdown_timeout=30)
    daemon = Daemon(config)
    worker = 0
    try:
        daemon.wait_ready()
        with daemon.client() as client:
            client.call("add", magnet="magnet:?xt=urn:btih:" + "34" * 20, task_id="safe")
        (worker,) = children(daemon.process.pid)
        os.kill(worker, signal.SIGSTOP)
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for_notice("STOPPING=1")
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(DEADLINE) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
    finally:
        daemon.close()
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    state = json.loads(layout_of(config).state_file.read_bytes())
    assert list(state["downloads"]) == ["safe"]


def test_sigterm_during_the_boot_replay_stops_without_finishing_it(tmp_path: Path) -> None:
    # Thousands of downloads make a replay of seconds; the stop used to wait for its end.
    config = write_config(tmp_path / "etc", tmp_path / "library")
    layout = layout_of(config)
    store = StateStore(layout.state_dir, MigrationContext(download_path=layout.download_path))
    store.acquire_lock()
    try:
        store.write({f"r{n:05d}": make_record(f"r{n:05d}") for n in range(6000)})
    finally:
        store.release_lock()
    daemon = Daemon(config)
    try:
        deadline = time.monotonic() + DEADLINE
        while "worker (pid" not in daemon.log.read_text():  # the replay begins now
            assert daemon.process.poll() is None, daemon.log.read_text()
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.02)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(DEADLINE) == 0
    finally:
        daemon.close()
    log = daemon.log.read_text()
    assert "received SIGTERM during the replay: stopping" in log
    assert "replayed 6000 of 6000" not in log
    assert len(json.loads(layout.state_file.read_bytes())["downloads"]) == 6000  # all kept
