"""The command lines as a user meets them: real processes, exit statuses, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.state import MigrationContext
from actors.statefile import StateStore
from tests.daemons import Daemon, running_daemon, write_config
from tests.records import make_record

DEADLINE = 20.0


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running daemon on a library that holds one download, `seeded-1`."""
    (tmp_path / "library").mkdir(exist_ok=True)
    store = StateStore(tmp_path / "library" / "data", MigrationContext(tmp_path / "dl"))
    store.acquire_lock()
    store.write({"seeded-1": make_record("seeded-1")})
    store.release_lock()
    with running_daemon(write_config(tmp_path / "etc", tmp_path / "library")) as running:
        yield running


def test_dlkeeper_help_lists_serve() -> None:
    result = run("-m", "supervisor", "--help")
    assert result.returncode == 0
    assert "serve" in result.stdout


def test_dlkeeper_state_help_lists_show() -> None:
    result = run("-m", "supervisor.state_cli", "--help")
    assert result.returncode == 0
    assert "show" in result.stdout


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("resume_save_interval = -5\n")
    result = run("-m", "supervisor", "serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dlkeeper: config error: resume_save_interval: input should be greater than 0, got -5"
    ]


def test_serve_with_a_missing_dlkeeper_config_exits_2(tmp_path: Path) -> None:
    result = run("-m", "supervisor", "serve", env={"DLKEEPER_CONFIG": str(tmp_path / "no.toml")})
    assert result.returncode == 2
    assert "cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_an_unknown_flag_exits_2() -> None:
    result = run("-m", "supervisor", "serve", "--no-such-flag")
    assert result.returncode == 2
    assert "--no-such-flag" in result.stderr


def test_unknown_libtorrent_setting_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "library", libtorrent={"no_such_setting": 1})
    result = run("-m", "supervisor", "serve", "--config", str(config))
    assert result.returncode == 2
    assert (
        "dlkeeper: config error: libtorrent.no_such_setting: unknown libtorrent setting"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_second_daemon_on_the_same_library_exits_3_naming_the_lock(
    tmp_path: Path, daemon: Daemon
) -> None:
    config = write_config(tmp_path / "second", tmp_path / "library")
    result = run("-m", "supervisor", "serve", "--config", str(config))
    assert result.returncode == 3
    lock = tmp_path / "library" / "data" / "downloads.json.lock"
    assert f"dlkeeper: another dlkeeper holds the state lock {lock}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_the_daemon_with_status_0_and_releases_the_lock(
    tmp_path: Path, daemon: Daemon
) -> None:
    assert daemon.stop() == 0
    (tmp_path / "library").mkdir(exist_ok=True)
    store = StateStore(tmp_path / "library" / "data", MigrationContext(tmp_path / "dl"))
    store.acquire_lock()  # would raise StateLocked if the daemon had kept it
    store.release_lock()


def test_state_show_lists_downloads_while_the_daemon_holds_the_lock(
    tmp_path: Path, daemon: Daemon
) -> None:
    result = run("-m", "supervisor.state_cli", "--library-path", str(tmp_path / "library"), "show")
    assert result.returncode == 0
    assert "1 download in" in result.stdout
    assert "seeded-1" in result.stdout
