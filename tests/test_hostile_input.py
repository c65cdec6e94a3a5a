"""Hostile input, and no acknowledged lie about it (issue 10): a request value the state file
cannot hold is refused on its own and costs nothing else."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest

from actors.errors import BadRequest, StateWriteFailed
from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from actors.persistence import Persistence, PersistenceActor
from actors.statefile import LoadSource, StateStore
from tests.api import (
    Served,
    error_of,
    fixture_fresh,  # noqa: F401 (a fixture)
    line,
)
from tests.records import make_record

pytestmark = pytest.mark.timeout(60)

DEADLINE = 20.0


def nested(levels: int) -> dict[str, Any]:
    """A JSON object `levels` objects deep."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def magnet() -> str:
    return f"magnet:?xt=urn:btih:{uuid.uuid4().hex + uuid.uuid4().hex[:8]}"


# --- values the state file cannot hold ----------------------------------------------------------


def test_an_add_the_state_file_cannot_hold_is_refused_alone_and_the_daemon_lives_on(
    fresh: Served,
) -> None:
    # orjson reads 1,024 levels but writes 254: such an add used to kill the persistence actor,
    # and the daemon with it, losing the replies of every add in the same write.
    requests: dict[str, dict[str, Any]] = {
        "good-1": {"magnet": magnet()},
        "deep-torrent": {"magnet": magnet(), "torrent_metadata": nested(260)},
        "deep-validation": {"magnet": magnet(), "validation_metadata": nested(600)},
        "good-2": {"magnet": magnet()},
    }
    with fresh.client() as client:
        client.send_raw(
            b"".join(
                line({"id": task_id, "op": "add", "task_id": task_id, **params})
                for task_id, params in requests.items()
            )
        )
        replies = {reply["id"]: reply for reply in (client.read_reply() for _ in requests)}
        assert replies["good-1"]["ok"] and replies["good-2"]["ok"], replies
        for task_id, field in (
            ("deep-torrent", "torrent_metadata"),
            ("deep-validation", "validation_metadata"),
        ):
            error = error_of(replies[task_id])
            assert error["code"] == "bad_request"
            assert error["message"].startswith(f"{field} cannot be saved"), error
        assert client.call("ping")["ready"] is True
    assert fresh.daemon.process.poll() is None
    assert set(fresh.library.state()) == {"good-1", "good-2"}


@asynccontextmanager
async def running(store: StateStore) -> AsyncIterator[Persistence]:
    async with actor_group() as group:
        yield Persistence(await group.start(PersistenceActor(store)))


def on_disk(store: StateStore) -> dict[str, Any]:
    downloads = orjson.loads(store.path.read_bytes())["downloads"]
    assert isinstance(downloads, dict)
    return downloads


@pytest.mark.anyio
async def test_metadata_as_deep_as_the_state_file_holds_is_saved_one_level_more_is_refused(
    store: StateStore,
) -> None:
    deepest = make_record("deepest").model_copy(update={"torrent_metadata": nested(251)})
    too_deep = make_record("too-deep").model_copy(update={"torrent_metadata": nested(252)})
    with anyio.fail_after(DEADLINE):
        async with running(store) as persistence:
            await persistence.add(deepest)
            with pytest.raises(BadRequest, match=r"^torrent_metadata cannot be saved"):
                await persistence.add(too_deep)
            later = await persistence.add(make_record("later"))
            assert not later.existed
        async with running(store) as persistence:  # and what was saved loads again
            assert set(await persistence.snapshot()) == {"deepest", "later"}


@pytest.mark.anyio
async def test_an_update_the_state_file_cannot_hold_is_refused_and_the_record_kept(
    store: StateStore,
) -> None:
    with anyio.fail_after(DEADLINE):
        async with running(store) as persistence:
            await persistence.add(make_record("kept"))
            with pytest.raises(BadRequest, match=r"^error cannot be saved"):
                await persistence.update("kept", RecordChanges(error="lone \ud800 surrogate"))
            assert (await persistence.get("kept")).error is None
            await persistence.update("kept", RecordChanges(progress=0.5))
    assert on_disk(store)["kept"]["progress"] == 0.5


@pytest.mark.anyio
async def test_a_write_failing_with_any_error_fails_its_batch_and_the_actor_carries_on(
    store: StateStore,
) -> None:
    # Not an OSError: the store refuses to write without its lock (StateError). Any such
    # failure used to end the actor, and the daemon with it.
    with anyio.fail_after(DEADLINE):
        async with running(store) as persistence:
            await persistence.add(make_record("kept"))
            store.release_lock()
            try:
                with pytest.raises(StateWriteFailed, match="lock"):
                    await persistence.add(make_record("refused"))
            finally:
                store.acquire_lock()
            await persistence.add(make_record("later"))
            assert set(await persistence.snapshot()) == {"kept", "later"}
    assert set(on_disk(store)) == {"kept", "later"}


def test_a_state_file_with_a_value_too_deep_to_write_back_is_quarantined_not_loaded(
    store: StateStore,
) -> None:
    # A hand-edited file orjson reads but cannot write: loaded, every later write would fail.
    entry = orjson.loads(make_record("deep").to_json())
    entry["torrent_metadata"] = nested(300)
    store.path.write_text(json.dumps({"version": 1, "downloads": {"deep": entry}}))
    store.acquire_lock()
    try:
        downloads, report = store.load()
    finally:
        store.release_lock()
    assert downloads == {}
    assert report.source is LoadSource.EMPTY
    assert len(report.quarantined) == 1 and report.quarantined[0].exists()
    assert "downloads.deep: torrent_metadata cannot be saved" in report.problems[0]
