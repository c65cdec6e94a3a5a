"""The message API's socket file: its mode, a stale one replaced, one that is not a socket kept."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from tests.api import (
    DEADLINE,
    Served,
    assert_serving,
    fixture_fresh,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    fixture_short_dir,  # noqa: F401 (a fixture)
    make_library,
)
from tests.daemons import Daemon, RawClient, running_daemon


def test_the_socket_is_a_unix_socket_with_mode_0660(shared: Served) -> None:
    mode = shared.daemon.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_a_stale_socket_file_is_replaced_when_the_daemon_starts(
    tmp_path: Path, short_dir: Path
) -> None:
    path = short_dir / "api.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # a daemon that died left its socket file behind
    leftover.close()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
        pytest.raises(ConnectionRefusedError),
    ):
        probe.connect(str(path))  # nobody listens there
    library = make_library(tmp_path, socket_path=path)
    with running_daemon(library.config), RawClient(path, timeout=DEADLINE) as client:
        assert client.call("ping")["ready"] is True
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660


def test_a_daemon_refused_the_lock_leaves_the_running_daemons_socket_alone(
    fresh: Served,
) -> None:
    before = fresh.daemon.socket.lstat().st_ino
    second = Daemon(fresh.library.config)
    try:
        assert second.process.wait(DEADLINE) == 3
    finally:
        second.close()
    assert fresh.daemon.socket.lstat().st_ino == before
    assert_serving(fresh)


def test_a_file_that_is_not_a_socket_is_not_replaced(tmp_path: Path, short_dir: Path) -> None:
    path = short_dir / "api.sock"
    path.write_text("not a socket\n")
    library = make_library(tmp_path, socket_path=path)
    daemon = Daemon(library.config)
    try:
        assert daemon.process.wait(DEADLINE) == 2
    finally:
        daemon.close()
    assert path.read_text() == "not a socket\n"
