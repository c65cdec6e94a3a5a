"""The socket under pressure: more idle connections than descriptors, a failing accept(), and
two daemons (of two libraries) given one socket path."""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.api import (
    DEADLINE,
    Library,
    add_torrent,
    assert_closed,
    code_of,
    fixture_short_dir,  # noqa: F401 (a fixture)
    line,
    make_library,
    new_payload,
    wait_until,
)
from tests.daemons import Daemon, RawClient

LIMIT = 128  # descriptors for the daemon: systemd's usual 1,024 is this, eight times over
# Runs the daemon with RLIMIT_NOFILE at LIMIT, as `prlimit --nofile=128:128` would.
LIMITED = (
    sys.executable,
    "-c",
    "import os, resource, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT})); "
    "os.execv(sys.argv[1], sys.argv[1:])",
)
# What the daemon keeps free for its state file and the rest with every connection in use.
FREE_AT_PEAK = 32
CAP_LINE = re.compile(r"serving at most (\d+) connections at once")


@contextlib.contextmanager
def started(library: Library, command_prefix: tuple[str, ...] = ()) -> Iterator[Daemon]:
    daemon = Daemon(library.config, command_prefix=command_prefix)
    try:
        yield daemon.wait_ready()
    finally:
        daemon.close()


def connect_and_ping(daemon: Daemon) -> tuple[RawClient, dict[str, Any]]:
    """A new connection and the first line the daemon sends on it after a ping."""
    client = RawClient(daemon.socket, timeout=DEADLINE)
    try:
        # A refusal may come, and the daemon hang up, before the ping is even sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send_raw(line({"id": 1, "op": "ping"}))
        return client, client.read_message()
    except (ConnectionError, TimeoutError) as exc:
        client.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.process.wait(5)  # a daemon that hung up on everyone may be exiting
        raise AssertionError(
            f"no answer ({exc!r}); daemon exit status {daemon.process.poll()}, log:\n"
            f"{daemon.log.read_text()[-2000:]}"
        ) from None


def descriptors_of(daemon: Daemon) -> int:
    return len(list(Path(f"/proc/{daemon.process.pid}/fd").iterdir()))


def log_count(daemon: Daemon, text: str) -> int:
    return daemon.log.read_text().count(text)


# --- item 8: idle connections never exhaust the daemon's descriptors ---------------------------


def test_connections_past_the_cap_are_refused_and_the_daemon_keeps_serving(
    tmp_path: Path,
) -> None:
    library = make_library(tmp_path)
    held: list[RawClient] = []
    try:
        with started(library, LIMITED) as daemon:
            refusal: dict[str, Any] | None = None
            for _ in range(LIMIT + 20):  # more than could ever be open at once
                client, first = connect_and_ping(daemon)
                if first.get("ok") is True:
                    held.append(client)  # idle from now on
                    continue
                refusal = first
                assert_closed(client)
                client.close()
                break
            assert refusal is not None, f"{len(held)} connections, none refused"
            assert refusal["id"] is None
            assert code_of(refusal) == "not_ready"
            assert f"at most {len(held)} connections" in refusal["error"]["message"]
            found = CAP_LINE.search(daemon.log.read_text())
            assert found is not None and int(found[1]) == len(held)
            peak = descriptors_of(daemon)
            print(f"cap {len(held)}, {len(held)} idle connections held, {peak} descriptors open")
            assert peak <= LIMIT - FREE_AT_PEAK, "the reserve went to connections"

            for _ in range(5):  # every one past the cap: one line, then the end of the stream
                client, first = connect_and_ping(daemon)
                with client:
                    assert code_of(first) == "not_ready"
                    assert_closed(client)
            assert log_count(daemon, "refusing connections") == 1  # once for the burst
            # The command line says why, too (through supervisor.client).
            command = [sys.executable, "-m", "supervisor", "stats", "--socket", str(daemon.socket)]
            refused = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=DEADLINE
            )
            assert refused.returncode == 1
            assert f"not_ready: dlkeeper serves at most {len(held)} connections" in refused.stderr

            # A held connection still works, and a durable add still finds descriptors for
            # the state file and the .torrent copy.
            busy = held[0]
            assert busy.call("ping")["ready"] is True
            added = add_torrent(busy, new_payload(tmp_path), task_id="past-the-cap")
            assert added["task_id"] == "past-the-cap"
            assert "past-the-cap" in library.state()
            assert (library.torrents / "past-the-cap.torrent").is_file()

            for client in held:
                client.close()
            held.clear()

            def serves_a_new_connection() -> bool:
                client, first = connect_and_ping(daemon)
                with client:
                    return first.get("ok") is True

            wait_until(serves_a_new_connection, "a new connection once the idle ones closed")
            assert daemon.process.poll() is None
            assert daemon.stop() == 0
    finally:
        for client in held:
            client.close()


def test_a_failing_accept_is_retried_and_said_once(tmp_path: Path) -> None:
    library = make_library(tmp_path)
    with started(library) as daemon, daemon.client() as held:
        assert held.call("ping")["ready"] is True  # accepted, before accept() fails
        pid = daemon.process.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # No descriptor past stdin, stdout and stderr: every accept() fails with EMFILE.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        try:
            waiting = RawClient(daemon.socket, timeout=DEADLINE)  # queued, not yet accepted
            waiting.send_raw(line({"id": "waiting", "op": "ping"}))
            wait_until(
                lambda: (
                    log_count(daemon, "cannot accept connections") > 0
                    or daemon.process.poll() is not None
                ),
                "the daemon to say that accept() fails",
            )
            assert daemon.process.poll() is None, daemon.log.read_text()[-2000:]
            assert held.call("ping")["ready"] is True  # the open connection is served meanwhile
        finally:
            with contextlib.suppress(ProcessLookupError):  # a daemon that died of it
                resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        with waiting:
            reply = waiting.read_message()  # accepted at the next retry
            assert reply["id"] == "waiting" and reply["ok"] is True, reply
        assert log_count(daemon, "cannot accept connections") == 1  # once for the burst
        assert log_count(daemon, "accepting connections again") == 1
        assert daemon.stop() == 0


# --- item 10: one socket path, two daemons ------------------------------------------------------


def wait_exit_or_ready(daemon: Daemon) -> int:
    """The exit status of a daemon expected to refuse to start; fails if it gets ready."""
    try:
        daemon.wait_for_notice("READY=1")
    except AssertionError:
        status = daemon.process.poll()
        if status is None:
            raise
        return status
    raise AssertionError(f"the daemon started; log:\n{daemon.log.read_text()[-2000:]}")


def test_a_daemon_refuses_a_socket_another_daemon_answers_on(
    tmp_path: Path, short_dir: Path
) -> None:
    path = short_dir / "api.sock"
    first_library = make_library(tmp_path / "first", socket_path=path)
    second_library = make_library(tmp_path / "second", socket_path=path)
    with started(first_library) as first:
        before = path.lstat()
        second = Daemon(second_library.config)
        try:
            assert wait_exit_or_ready(second) == 1
        finally:
            second.close()
        assert f"dlkeeper: another dlkeeper answers on {path};" in second.log.read_text()
        assert not second_library.torrents.exists()  # refused before replaying its library
        after = path.lstat()
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        with first.client() as client:
            assert client.call("ping")["ready"] is True
        assert first.stop() == 0
    assert not path.exists()


def test_a_daemon_refuses_a_socket_another_process_listens_on(
    tmp_path: Path, short_dir: Path
) -> None:
    path = short_dir / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)  # listens, never answers
        daemon = Daemon(make_library(tmp_path, socket_path=path).config)
        try:
            assert wait_exit_or_ready(daemon) == 1
        finally:
            daemon.close()
        assert f"dlkeeper: another process answers on {path};" in daemon.log.read_text()
        assert path.exists()


def test_stopping_a_daemon_leaves_the_socket_another_daemon_put_at_its_path(
    tmp_path: Path, short_dir: Path
) -> None:
    path = short_dir / "api.sock"
    first_library = make_library(tmp_path / "first", socket_path=path)
    second_library = make_library(tmp_path / "second", socket_path=path)
    with started(first_library) as first:
        path.unlink()  # the first daemon's socket file is gone (an operator, a /tmp cleaner)
        with started(second_library) as second:
            made = path.lstat()
            assert first.stop() == 0
            found = path.lstat()
            assert (found.st_dev, found.st_ino) == (made.st_dev, made.st_ino)
            assert "it is no longer this daemon's socket" in first.log.read_text()
            with second.client() as client:
                assert client.call("ping")["ready"] is True
            assert second.stop() == 0
    assert not path.exists()
