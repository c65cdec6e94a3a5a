"""Byte budgets: how much memory many tasks may hold at once, shared by weight.

A `ByteBudget` is a weighted semaphore counted in bytes. A task takes what it is about to hold
and gives it back when done; one that does not fit waits, in the order the waiters came, so a
large request is never passed over for good by small ones. A single charge larger than the
whole budget is let in once nothing else is held, then holds it alone: served, never stuck.

`HeldBytes` is what one request holds of any number of budgets, given back together; while it
is `serving()`, code the request runs finds it with `held_bytes()` and adds to it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel


@dataclass(eq=False)
class _Waiter:
    size: int
    granted: anyio.Event = field(default_factory=anyio.Event)


class ByteBudget:
    """At most `capacity` bytes held at once (one charge larger than that, alone)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("a byte budget needs a positive capacity")
        self._capacity = capacity
        self._held = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def held(self) -> int:
        """Bytes held now (above `capacity` only while one oversized charge is alone)."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many charges wait for room."""
        return len(self._waiters)

    async def acquire(self, size: int) -> None:
        """Waits until `size` bytes fit, then holds them: give them back with `release`."""
        _check_size(size)
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self._fits(size):
            self._held += size
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():  # granted as it was cancelled: give it back
                self.release(size)
            else:
                self._waiters.remove(waiter)
                self._grant()  # it may have held up smaller charges behind it
            raise

    def acquire_nowait(self, size: int) -> None:
        """Holds `size` bytes at once, over the capacity if need be: for bytes already in
        memory (a file that grew after it was measured), which waiting would not give back."""
        _check_size(size)
        self._held += size

    def release(self, size: int) -> None:
        if size > self._held:
            raise RuntimeError(f"released {size} bytes of a budget that holds {self._held}")
        self._held -= size
        self._grant()

    def _fits(self, size: int) -> bool:
        return self._held == 0 or self._held + size <= self._capacity

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0].size):
            waiter = self._waiters.popleft()
            self._held += waiter.size
            waiter.granted.set()


class HeldBytes:
    """What one request holds of byte budgets, given back together by `release()`."""

    def __init__(self) -> None:
        self._held: dict[ByteBudget, int] = {}

    @property
    def size(self) -> int:
        """Bytes held, of all budgets together."""
        return sum(self._held.values())

    async def take(self, budget: ByteBudget, size: int) -> None:
        """Waits for `size` bytes of `budget`. A request that holds some of a budget and waits
        for more of it can wait for another doing the same: take what it needs at once."""
        await budget.acquire(size)
        self._held[budget] = self._held.get(budget, 0) + size

    def take_nowait(self, budget: ByteBudget, size: int) -> None:
        """Takes `size` bytes of `budget` at once, over its capacity if need be (see
        `ByteBudget.acquire_nowait`)."""
        budget.acquire_nowait(size)
        self._held[budget] = self._held.get(budget, 0) + size

    def release(self) -> None:
        """Gives everything back; again, nothing more."""
        held, self._held = self._held, {}
        for budget, size in held.items():
            budget.release(size)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Makes this the `held_bytes()` of the code run inside (in this task)."""
        token = _serving.set(self)
        try:
            yield
        finally:
            _serving.reset(token)


_serving: ContextVar[HeldBytes] = ContextVar("held_bytes")


def held_bytes() -> HeldBytes:
    """What the request served in this task holds (see `HeldBytes.serving`)."""
    try:
        return _serving.get()
    except LookupError:
        raise RuntimeError("no request is being served in this task") from None


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError("a charge is a number of bytes, not negative")
