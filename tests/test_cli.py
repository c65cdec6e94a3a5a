"""The command lines as a user meets them: real processes, exit statuses, one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.state import MigrationContext
from actors.statefile import StateStore
from tests.records import make_record
from tests.swarm import LOOPBACK_SETTINGS

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


def loopback_config(directory: Path, library: Path, **libtorrent: str | int | bool) -> Path:
    """A config file for a daemon that only ever touches 127.0.0.1."""
    settings = {**LOOPBACK_SETTINGS, **libtorrent}
    lines = [
        f'library_path = "{library}"',
        f'socket = "{library / "api.sock"}"',
        "",
        "[libtorrent]",
    ]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dlkeeper.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


class Daemon:
    """`dlkeeper serve` in a child process, stopped (and if need be killed) on exit."""

    def __init__(self, library: Path) -> None:
        config = loopback_config(library.parent, library)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_running(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:  # the daemon logs to stderr; the pipe has a deadline via
            if "dlkeeper running" in line:  # pytest-timeout, and EOF ends the loop if it dies
                return
        pytest.fail(f"daemon exited with {self.process.wait(DEADLINE)} before it was running")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(DEADLINE)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(DEADLINE)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running daemon on a library that holds one download, `seeded-1`."""
    store = StateStore(tmp_path / "library" / "data", MigrationContext(tmp_path / "dl"))
    store.acquire_lock()
    store.write({"seeded-1": make_record("seeded-1")})
    store.release_lock()
    running = Daemon(tmp_path / "library")
    try:
        running.wait_running()
        yield running
    finally:
        running.kill()


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
    config = loopback_config(tmp_path, tmp_path / "library", no_such_setting=1)
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
    config = loopback_config(tmp_path / "second", tmp_path / "library")
    result = run("-m", "supervisor", "serve", "--config", str(config))
    assert result.returncode == 3
    lock = tmp_path / "library" / "data" / "downloads.json.lock"
    assert f"dlkeeper: another dlkeeper holds the state lock {lock}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_the_daemon_with_status_0_and_releases_the_lock(
    tmp_path: Path, daemon: Daemon
) -> None:
    assert daemon.stop() == 0
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
