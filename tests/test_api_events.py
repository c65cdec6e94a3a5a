"""The message API's events: subscribe, their order and seq, the completion backlog, progress."""

from __future__ import annotations

from pathlib import Path

from tests.api import (
    COMPLETED_EVENT_KEYS,
    Served,
    add_started,
    add_torrent,
    fixture_api,  # noqa: F401 (a fixture)
    fixture_fresh,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    line,
    make_library,
    new_id,
    new_payload,
    seeding_now,
    subscribe,
    wait_event,
    wait_status,
)
from tests.daemons import RawClient, running_daemon


def test_the_subscribe_ok_comes_before_any_event(fresh: Served, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    with fresh.client() as client, seeding_now(payload) as seeder:
        add_torrent(client, payload, task_id="done", peers=[seeder.peer])
        wait_status(client, "done", "completed")
    with fresh.client() as events:  # a completion is waiting for it: the ok still goes first
        events.send_raw(line({"id": 9, "op": "subscribe"}))
        assert events.read_message() == {"id": 9, "ok": True, "result": {}}
        assert events.read_message()["event"] == "download.completed"


def test_subscribers_receive_added_paused_resumed_and_removed_in_order(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("lifecycle")
    with subscribe(shared) as events:
        add_started(api, shared.library, new_payload(tmp_path), task_id)
        api.call("pause", task_id=task_id)
        api.call("resume", task_id=task_id)
        api.call("cancel", task_id=task_id)
        names = ["download.added", "download.paused", "download.resumed", "download.removed"]
        received = [wait_event(events, name, task_id) for name in names]
    for name, event in zip(names, received, strict=True):
        assert set(event) == {"event", "seq", "task_id"}
        assert event["event"] == name
    seqs = [event["seq"] for event in received]
    assert seqs == sorted(set(seqs))


def test_event_seq_increases_on_every_connection(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_ids = [new_id("seq") for _ in range(3)]
    with subscribe(shared) as first, subscribe(shared) as second:
        for task_id in task_ids:
            add_torrent(api, new_payload(tmp_path), task_id=task_id)
            api.call("pause", task_id=task_id)
        for events in (first, second):
            last = wait_event(events, "download.paused", task_ids[-1])  # the last one read
            seqs = [event["seq"] for event in [*events.events, last]]
            assert len(seqs) >= 6
            assert seqs == sorted(set(seqs))


def test_every_subscribe_first_receives_every_unacknowledged_completion(
    fresh: Served, tmp_path: Path
) -> None:
    payloads = [new_payload(tmp_path) for _ in range(3)]
    with fresh.client() as client, seeding_now(*payloads) as seeder:
        for index, payload in enumerate(payloads):
            add_torrent(client, payload, task_id=f"done-{index}", peers=[seeder.peer])
        for index in range(3):
            wait_status(client, f"done-{index}", "completed")
        add_torrent(client, new_payload(tmp_path), task_id="running")
    for _ in range(2):  # a second subscriber gets them again
        with subscribe(fresh) as events:
            first = [events.read_message() for _ in payloads]
        assert {event["event"] for event in first} == {"download.completed"}
        assert {event["task_id"] for event in first} == {"done-0", "done-1", "done-2"}
        assert all(set(event) == COMPLETED_EVENT_KEYS for event in first)


def test_an_acknowledged_completion_is_not_sent_to_later_subscribers(
    fresh: Served, tmp_path: Path
) -> None:
    payloads = [new_payload(tmp_path) for _ in range(2)]
    with fresh.client() as client, seeding_now(*payloads) as seeder:
        for index, payload in enumerate(payloads):
            add_torrent(client, payload, task_id=f"done-{index}", peers=[seeder.peer])
        for index in range(2):
            wait_status(client, f"done-{index}", "completed")
        client.call("ack", task_id="done-0")
        with subscribe(fresh) as events:
            add_torrent(client, new_payload(tmp_path), task_id="marker")
            # The backlog, then the live event: anything of done-0 would come in between.
            backlog, live = events.read_message(), events.read_message()
    assert (backlog["event"], backlog["task_id"]) == ("download.completed", "done-1")
    assert (live["event"], live["task_id"]) == ("download.added", "marker")


def test_an_unacknowledged_completion_is_sent_after_a_daemon_restart(
    tmp_path: Path,
) -> None:
    payload = new_payload(tmp_path)
    library = make_library(tmp_path)
    with running_daemon(library.config) as daemon, seeding_now(payload) as seeder:
        with daemon.client() as client:
            add_torrent(
                client, payload, task_id="done", peers=[seeder.peer], torrent_metadata={"id": 1}
            )
            wait_status(client, "done", "completed")
        assert daemon.stop() == 0
    with running_daemon(library.config) as daemon, daemon.client() as events:
        events.send_raw(line({"id": 1, "op": "subscribe"}))
        assert events.read_message() == {"id": 1, "ok": True, "result": {}}
        event = events.read_message()
    assert event["event"] == "download.completed"
    assert event["task_id"] == "done"
    assert event["torrent_metadata"] == {"id": 1}


def test_progress_events_are_sent_only_with_a_progress_interval(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("progress")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)  # no peers: it stays downloading
    with subscribe(shared, progress_interval=0.1) as with_progress, subscribe(shared) as without:
        for _ in range(3):
            progress = wait_event(with_progress, "download.progress", task_id, timeout=5.0)
        assert set(progress) == {
            "event",
            "seq",
            "task_id",
            "progress",
            "download_rate",
            "num_peers",
        }
        assert progress["progress"] == 0.0
        api.call("pause", task_id=task_id)  # a marker: everything before it has arrived
        wait_event(without, "download.paused", task_id)
        assert [e for e in without.events if e["event"] == "download.progress"] == []
