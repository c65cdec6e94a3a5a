"""The event bus: numbering, fan-out, and dropping a subscriber that falls behind."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from actors.bus import EventBus
from actors.messages.wire import DownloadAddedEvent

pytestmark = pytest.mark.anyio


def added(task_id: str) -> Callable[[int], DownloadAddedEvent]:
    return lambda seq: DownloadAddedEvent(seq=seq, task_id=task_id)


async def test_events_are_numbered_in_order_and_reach_every_subscriber() -> None:
    bus = EventBus()
    first, second = bus.subscribe(), bus.subscribe()
    for task_id in ("a", "b", "c"):
        bus.publish(added(task_id))
    for subscription in (first, second):
        with anyio.fail_after(1):
            received = [await subscription.events.receive() for _ in range(3)]
        assert [(e.seq, e.task_id) for e in received if isinstance(e, DownloadAddedEvent)] == [
            (1, "a"),
            (2, "b"),
            (3, "c"),
        ]


async def test_a_subscriber_that_falls_behind_is_dropped_and_others_go_on() -> None:
    bus = EventBus(queue_size=5)
    slow, fast = bus.subscribe(), bus.subscribe()
    for n in range(8):
        bus.publish(added(f"t{n}"))
        with anyio.fail_after(1):
            await fast.events.receive()  # the fast one keeps up
    assert slow.overflowed
    assert not fast.overflowed
    assert bus.subscribers == 1
    # The slow one gets what it had queued, then the end of its stream: its connection closes.
    queued = [event async for event in slow.events]
    assert len(queued) == 5


async def test_unsubscribed_queue_ends() -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    bus.unsubscribe(subscription)
    bus.publish(lambda seq: DownloadAddedEvent(seq=seq, task_id="x"))
    assert [event async for event in subscription.events] == []
