"""Fuzzing the message API of a real daemon: whatever arrives, the daemon answers every request
with a contract code, never dies, and a refused request never changes the state file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemons import (
    CONTRACT_ERROR_CODES,
    Daemon,
    RawClient,
    layout_of,
    running_daemon,
    write_config,
)

pytestmark = pytest.mark.timeout(240)

CODES = CONTRACT_ERROR_CODES
OPS = [
    "ping", "add", "get", "list", "pause", "resume", "cancel", "set_files", "ack", "retry", "stats",
]  # fmt: skip
PARAMS = [
    "magnet",
    "torrent_b64",
    "torrent_path",
    "task_id",
    "name",
    "save_path",
    "file_priorities",
    "paused",
    "peers",
    "torrent_metadata",
    "validation_metadata",
    "delete_files",
    "progress_interval",
    "bogus",
]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["magnet:?xt=urn:btih:", "/etc/passwd", "../..", "/dev/zero", "a" * 65]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
REQUESTS = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | st.text(max_size=10) | JSON},
    optional={"id": st.integers(-(2**31), 2**31) | st.text(max_size=10) | JSON},
).flatmap(
    lambda base: st.dictionaries(st.sampled_from(PARAMS), JSON, max_size=5).map(
        lambda params: {**params, **base}
    )
)
LINES = st.one_of(
    REQUESTS.map(lambda request: json.dumps(request).encode()),
    st.binary(max_size=200).map(lambda raw: raw.replace(b"\n", b" ")),
    JSON.map(lambda value: json.dumps(value).encode()),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("fuzz")
    with running_daemon(write_config(root / "etc", root / "library")) as running:
        yield running


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[RawClient]:
    with daemon.client() as connection:
        yield connection


def state_bytes(daemon: Daemon) -> bytes | None:
    path = layout_of(Path(daemon.config)).state_file
    return path.read_bytes() if path.exists() else None


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(LINES)
def test_any_line_gets_a_reply_with_a_contract_code_and_a_refusal_changes_nothing(
    daemon: Daemon, client: RawClient, line: bytes
) -> None:
    before = state_bytes(daemon)
    client.send_raw(line + b"\n")
    reply: dict[str, Any] = client.read_reply()
    assert set(reply) in ({"id", "ok", "result"}, {"id", "ok", "error"}), reply
    if reply["ok"]:
        assert isinstance(reply["result"], dict)
        return
    assert reply["error"]["code"] in CODES, reply
    assert isinstance(reply["error"]["message"], str)
    assert reply["error"]["code"] != "internal", reply  # nothing here should surprise it
    assert state_bytes(daemon) == before, f"{line!r} was refused but changed the state"


def test_the_daemon_is_alive_and_answers_after_the_fuzzing(
    daemon: Daemon, client: RawClient
) -> None:
    assert daemon.process.poll() is None
    assert client.call("ping")["ready"] is True
