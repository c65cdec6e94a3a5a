"""The event bus: numbers events (`seq`, per daemon lifetime) and fans them out to subscribers.

Each subscriber has a bounded queue. One that falls too far behind is dropped (its connection
is then closed): the daemon's memory never grows with a slow reader, and the durable events
(completed, failed) come back on the subscriber's next `subscribe` anyway.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.messages.base import Message

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Message)

SUBSCRIBER_QUEUE = 1000


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue; `overflowed` once it was dropped for falling behind."""

    events: MemoryObjectReceiveStream[Message]
    _send: MemoryObjectSendStream[Message]
    overflowed: bool = False


@dataclass
class EventBus:
    queue_size: int = SUBSCRIBER_QUEUE
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _subscribers: set[Subscription] = field(default_factory=set)

    def next_seq(self) -> int:
        return next(self._seq)

    def publish(self, make: Callable[[int], E]) -> E:
        """Numbers the event `make(seq)` builds and offers it to every subscriber."""
        event = make(self.next_seq())
        for subscription in list(self._subscribers):
            try:
                subscription._send.send_nowait(event)
            except anyio.WouldBlock:
                log.warning("a subscriber fell %d events behind; dropping it", self.queue_size)
                subscription.overflowed = True
                self.unsubscribe(subscription)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.unsubscribe(subscription)
        return event

    def subscribe(self) -> Subscription:
        send, receive = anyio.create_memory_object_stream[Message](self.queue_size)
        subscription = Subscription(receive, send)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        subscription._send.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
