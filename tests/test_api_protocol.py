"""The message API's line protocol: ids, bad lines, pipelining, the 8 MiB limit, disconnects."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.api import (
    DEADLINE,
    MAX_LINE,
    MiB,
    Served,
    assert_closed,
    assert_serving,
    b64,
    code_of,
    fixture_api,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    hang_up_and_wait,
    line,
    new_id,
    new_payload,
    padded_ping,
    send_until_hung_up,
    slow_torrent,
    subscribe,
    wait_read_by_daemon,
)
from tests.daemons import RawClient


def test_ping_answers_version_ready_and_problems(api: RawClient) -> None:
    reply = api.request("ping")
    assert set(reply) == {"id", "ok", "result"}
    assert reply["ok"] is True
    result = reply["result"]
    assert set(result) == {"version", "ready", "problems"}
    assert isinstance(result["version"], str)
    assert result["version"]
    assert result["ready"] is True
    assert result["problems"] == []


@pytest.mark.parametrize("request_id", [7, 0, -3, 2**53, "seven", "", "ünï €"])
def test_the_request_id_is_echoed_with_its_type(api: RawClient, request_id: int | str) -> None:
    api.send_raw(line({"id": request_id, "op": "ping"}))
    reply = api.read_reply()
    assert reply["ok"] is True
    assert reply["id"] == request_id
    assert type(reply["id"]) is type(request_id)


def test_an_error_reply_echoes_the_request_id(api: RawClient) -> None:
    api.send_raw(line({"id": "mine", "op": "get", "task_id": "no-such-download"}))
    reply = api.read_reply()
    assert reply["id"] == "mine"
    assert code_of(reply) == "not_found"


def test_an_unknown_op_is_answered_unknown_op(api: RawClient) -> None:
    assert code_of(api.request("frobnicate")) == "unknown_op"


@pytest.mark.parametrize(
    "bad_line",
    [
        pytest.param(b"garbage", id="not-json"),
        pytest.param(b'{"id": 1, "op": "ping"', id="truncated-json"),
        pytest.param(b'[{"id": 1, "op": "ping"}]', id="array"),
        pytest.param(b'"ping"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"task_id": "x"}', id="missing-op"),
        pytest.param(b'{"op": 5}', id="integer-op"),
        pytest.param(b'{"op": null}', id="null-op"),
        pytest.param(b'{"op": ["ping"]}', id="array-op"),
        pytest.param(b'{"id": true, "op": "ping"}', id="bool-id"),
        pytest.param(b'{"id": 1.5, "op": "ping"}', id="float-id"),
        pytest.param(b'{"id": {"n": 1}, "op": "ping"}', id="object-id"),
        pytest.param(b'{"id": [1], "op": "ping"}', id="array-id"),
        pytest.param(b'{"op": "ping", "x": "\xff\xfe"}', id="not-utf8"),
    ],
)
def test_a_bad_line_is_answered_bad_request_and_the_connection_stays_usable(
    api: RawClient, bad_line: bytes
) -> None:
    api.send_raw(bad_line + b"\n")
    reply = api.read_reply()
    assert reply["id"] is None
    assert code_of(reply) == "bad_request"
    assert api.call("ping")["ready"] is True


@pytest.mark.parametrize(
    ("op", "params"),
    [
        pytest.param("ping", {"extra": 1}, id="ping-unknown-parameter"),
        pytest.param("list", {"status": "paused"}, id="list-unknown-parameter"),
        pytest.param("stats", {"verbose": True}, id="stats-unknown-parameter"),
        pytest.param("get", {}, id="get-without-task_id"),
        pytest.param("get", {"task_id": 5}, id="get-integer-task_id"),
        pytest.param("get", {"task_id": None}, id="get-null-task_id"),
        pytest.param("pause", {"task_id": ["a"]}, id="pause-array-task_id"),
        pytest.param("resume", {"task_id": {"a": 1}}, id="resume-object-task_id"),
        pytest.param("cancel", {"task_id": "a", "delete_files": "yes"}, id="cancel-string-bool"),
        pytest.param("cancel", {"task_id": "a", "delete_files": 1}, id="cancel-integer-bool"),
        pytest.param("set_files", {"task_id": "a"}, id="set_files-without-priorities"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": [8]}, id="priority-8"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": [-1]}, id="priority-neg"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": ["4"]}, id="priority-str"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": 4}, id="priorities-int"),
        pytest.param("ack", {"task_id": 1.5}, id="ack-float-task_id"),
        pytest.param("add", {}, id="add-without-source"),
        pytest.param("add", {"magnet": 5}, id="add-integer-magnet"),
        pytest.param("add", {"torrent_b64": ["x"]}, id="add-array-torrent_b64"),
        pytest.param("add", {"torrent_path": 7}, id="add-integer-torrent_path"),
        pytest.param("add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "name": 3}, id="name"),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "name": ""}, id="empty-name"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "paused": "true"}, id="paused"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "save_path": 1}, id="save_path"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "peers": "1.2.3.4:5"}, id="peers"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "peers": ["nope"]}, id="peer"
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "peers": ["1.2.3.4:70000"]},
            id="peer-port",
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "torrent_metadata": [1]},
            id="torrent_metadata",
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "validation_metadata": "x"},
            id="validation_metadata",
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "file_priorities": [1, 9]},
            id="add-priority-9",
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "colour": "red"}, id="add-extra"
        ),
        pytest.param("subscribe", {"progress_interval": "1"}, id="interval-string"),
        pytest.param("subscribe", {"progress_interval": True}, id="interval-bool"),
        pytest.param("subscribe", {"progress_interval": 0}, id="interval-zero"),
        pytest.param("subscribe", {"progress_interval": -1}, id="interval-negative"),
        pytest.param("subscribe", {"topics": ["all"]}, id="subscribe-unknown-parameter"),
    ],
)
def test_wrong_parameters_are_answered_bad_request_and_the_connection_stays_usable(
    api: RawClient, op: str, params: dict[str, Any]
) -> None:
    assert code_of(api.request(op, **params)) == "bad_request"
    assert api.call("ping")["ready"] is True


def test_a_second_subscribe_on_one_connection_is_bad_request(shared: Served) -> None:
    with subscribe(shared) as events:
        assert code_of(events.request("subscribe")) == "bad_request"


def test_pipelined_requests_in_one_write_are_each_answered_under_their_id(
    api: RawClient,
) -> None:
    requests: list[dict[str, Any]] = [
        {"id": 1, "op": "ping"},
        {"id": "1", "op": "stats"},
        {"id": 2, "op": "list"},
        {"id": "two", "op": "get", "task_id": "no-such-download"},
        {"id": 3, "op": "frobnicate"},
        {"id": "3", "op": "ack", "task_id": "no-such-download"},
        *({"id": 100 + n, "op": "ping"} for n in range(20)),
    ]
    api.send_raw(b"".join(line(request) for request in requests))
    replies = [api.read_reply() for _ in requests]
    # 1 and "1" are two ids: a key per id *and* type.
    by_id = {(type(reply["id"]), reply["id"]): reply for reply in replies}
    assert set(by_id) == {(type(request["id"]), request["id"]) for request in requests}
    assert by_id[int, 1]["result"]["ready"] is True
    assert "uptime" in by_id[str, "1"]["result"]
    assert "downloads" in by_id[int, 2]["result"]
    assert code_of(by_id[str, "two"]) == "not_found"
    assert code_of(by_id[int, 3]) == "unknown_op"
    assert code_of(by_id[str, "3"]) == "not_found"
    assert all(by_id[int, 100 + n]["ok"] for n in range(20))


def test_a_slow_request_does_not_hold_up_a_ping_on_the_same_connection(api: RawClient) -> None:
    api.send_raw(line({"id": "slow", "op": "add", "torrent_b64": b64(slow_torrent())}))
    wait_read_by_daemon(api)  # the add is under way
    api.send_raw(line({"id": "quick", "op": "ping"}))
    first, second = api.read_reply(), api.read_reply()
    assert first["id"] == "quick"
    assert first["ok"] is True
    assert second["id"] == "slow"
    assert code_of(second) == "invalid_torrent"


def test_an_endless_line_is_answered_too_large_and_closed_after_about_8_mib(
    shared: Served,
) -> None:
    sent = 0
    with shared.client() as client:

        def send_without_newline() -> None:
            nonlocal sent
            chunk = b"a" * 65536
            try:
                while sent < 4 * MAX_LINE:
                    sent += client.sock.send(chunk)
            except OSError:
                pass  # the daemon hung up

        sender = threading.Thread(target=send_without_newline, daemon=True)
        sender.start()
        reply = client.read_message()
        assert reply["id"] is None
        assert code_of(reply) == "too_large"
        assert_closed(client)
        sender.join(DEADLINE)
        assert not sender.is_alive()
    # Read no further than the limit (plus what the socket buffers hold), never to the end.
    assert MAX_LINE <= sent < MAX_LINE + 4 * MiB


def test_a_too_large_line_leaves_other_connections_served(shared: Served) -> None:
    with shared.client() as bystander, shared.client() as offender:
        send_until_hung_up(offender, b"x" * (MAX_LINE + MiB))
        assert code_of(offender.read_message()) == "too_large"
        assert bystander.call("ping")["ready"] is True
    assert_serving(shared)


def test_a_line_of_exactly_8_mib_is_read_even_when_its_newline_comes_later(
    api: RawClient,
) -> None:
    api.send_raw(padded_ping(MAX_LINE))
    wait_read_by_daemon(api)
    api.send_raw(b"\n")
    reply = api.read_reply()
    assert reply["id"] == 1  # read and parsed: refused for its `pad`, not for its length
    assert code_of(reply) == "bad_request"
    assert api.call("ping")["ready"] is True


def test_a_line_just_over_8_mib_is_too_large_even_when_its_end_comes_in_one_read(
    api: RawClient,
) -> None:
    request = padded_ping(MAX_LINE + 100)
    api.send_raw(request[: MAX_LINE - 10])
    wait_read_by_daemon(api)
    api.send_raw(request[MAX_LINE - 10 :] + b"\n")  # limit crossed and newline, in one read
    reply = api.read_message()
    assert code_of(reply) == "too_large"
    assert_closed(api)


def test_a_disconnect_mid_line_leaves_the_daemon_serving(shared: Served) -> None:
    with shared.client() as client:
        client.send_raw(b'{"id": 1, "op": "pi')
    assert_serving(shared)


def test_a_request_cut_off_by_a_disconnect_is_not_carried_out(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("cut-off")
    request = line(
        {
            "id": 1,
            "op": "add",
            "task_id": task_id,
            "torrent_b64": b64(new_payload(tmp_path).torrent),
        }
    )
    with shared.client() as client:
        client.send_raw(request[:-1])  # all of it but its newline
        assert hang_up_and_wait(client) == b""  # no reply: no request
    assert code_of(api.request("get", task_id=task_id)) == "not_found"
    assert task_id not in shared.library.state()


def test_a_disconnect_before_the_replies_are_read_leaves_the_daemon_serving(
    shared: Served,
) -> None:
    with shared.client() as client:
        # More replies than the socket buffers hold: the daemon is mid-reply when we go.
        client.send_raw(b"".join(line({"id": n, "op": "stats"}) for n in range(3000)))
        assert client.read_reply()["ok"] is True
    assert_serving(shared)
