"""The actor kit: bounded mailboxes, `ActorRef.tell()`/`ask()`, ordered start and reverse stop.

An actor is an object with an async `run(inbox)` that owns its state alone. Other code holds only
its `ActorRef`. `ActorGroup.start()` runs `on_start()` before returning the ref (so a started actor
is ready), and `ActorGroup` stops actors in the reverse order of their start. When an actor ends,
for whatever reason, every `ask()` still waiting on it fails with `ActorDied`.

Two actors must never `ask()` each other: each would wait for the other's answer forever (up to
the deadline). Let one of them `tell()` instead.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.errors import (
    ActorDied,
    AskTimeout,
    ConfigError,
    DlkeeperError,
    MailboxFull,
    first_dlkeeper_error,
)

log = logging.getLogger(__name__)

M = TypeVar("M")
T = TypeVar("T")

DEFAULT_MAILBOX_SIZE = 1024


class Reply:
    """A one-shot answer to an `ask()`: the actor calls `send()` or `fail()` once."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: object = None
        self._error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self._done.is_set()

    def send(self, value: object) -> None:
        """Answer with `value`; later answers are ignored."""
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        """Answer by raising `error` in the asker; later answers are ignored."""
        if not self._done.is_set():
            self._error = error
            self._done.set()

    async def wait(self) -> object:
        await self._done.wait()
        error, self._error = self._error, None
        if error is None:
            return self._value
        # Neither this reply nor this frame keeps the error: its traceback holds the asker's
        # frames, and a cycle through them would keep what they hold (a request's .torrent,
        # say) until the cycle collector happens to run.
        try:
            raise error
        finally:
            del error


@dataclass(frozen=True, slots=True)
class Envelope(Generic[M]):
    """A message in a mailbox; `reply` is None for a `tell()`."""

    message: M
    reply: Reply | None = None

    def asked(self) -> Reply:
        """The reply an `ask()` waits for. For an actor that answers every message: a `tell()`
        to it is a bug in dlkeeper, and stops it."""
        if self.reply is None:
            raise DlkeeperError(f"{type(self.message).__name__} must be asked, not told")
        return self.reply


class Actor(ABC, Generic[M]):
    """Base of every actor. Subclasses implement `run()` and may override the hooks."""

    name: str = "actor"

    async def on_start(self) -> None:
        """Runs before the actor's ref is handed out; an exception here fails the start."""

    @abstractmethod
    async def run(self, inbox: MemoryObjectReceiveStream[Envelope[M]]) -> None:
        """Handles messages until the inbox is closed (a stop) or an error ends the actor."""

    async def on_stop(self) -> None:
        """Runs after `run()` returns or fails, shielded from cancellation.

        It does not run when `on_start()` failed: `on_start()` cleans up after itself.
        """


@dataclass(eq=False)
class ActorRef(Generic[M]):
    """The only handle on an actor: `tell()` and `ask()` over its bounded mailbox."""

    name: str
    _mailbox: MemoryObjectSendStream[Envelope[M]]
    _pending: set[Reply] = field(default_factory=set)
    _death: ActorDied | None = None
    _finished: anyio.Event = field(default_factory=anyio.Event)
    _scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    @property
    def alive(self) -> bool:
        return self._death is None

    async def tell(self, message: M) -> None:
        """Delivers `message` without waiting for an answer; waits while the mailbox is full."""
        self._check_alive()
        try:
            await self._mailbox.send(Envelope(message))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._died() from None

    def tell_nowait(self, message: M) -> None:
        """Delivers `message` at once, or raises `MailboxFull`."""
        self._check_alive()
        try:
            self._mailbox.send_nowait(Envelope(message))
        except anyio.WouldBlock:
            raise MailboxFull(self.name) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._died() from None

    async def ask(self, message: M, *, timeout: float) -> object:
        """Sends `message` and waits up to `timeout` seconds for the answer (or its error)."""
        self._check_alive()
        reply = Reply()
        self._pending.add(reply)
        try:
            # Not fail_after(): a TimeoutError the actor answers with is its answer, not ours.
            with anyio.move_on_after(timeout):
                try:
                    await self._mailbox.send(Envelope(message, reply))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    raise self._died() from None
                return await reply.wait()
        finally:
            self._pending.discard(reply)
        raise AskTimeout(self.name, type(message).__name__, timeout)

    async def wait_finished(self) -> None:
        """Returns once the actor has ended, `on_stop()` included."""
        await self._finished.wait()

    def _check_alive(self) -> None:
        if self._death is not None:
            raise self._died()

    def _died(self) -> ActorDied:
        # A fresh error per caller: one instance raised in many tasks piles up their tracebacks.
        return ActorDied(self.name, self._death.cause if self._death is not None else None)

    def _mark_dead(self, cause: BaseException | None) -> None:
        self._death = ActorDied(self.name, cause)
        for reply in list(self._pending):
            reply.fail(self._died())
        self._pending.clear()


async def _run_actor(
    actor: Actor[M],
    mailbox_size: int,
    register: Callable[[ActorRef[M]], None],
    *,
    task_status: TaskStatus[ActorRef[M]],
) -> None:
    send, receive = anyio.create_memory_object_stream[Envelope[M]](mailbox_size)
    try:
        await actor.on_start()
    except BaseException:
        send.close()
        receive.close()
        raise
    # Shielded: only `stop()` ends an actor, never the group's cancellation, so that the group
    # can stop its actors one at a time in reverse start order, whatever made it stop.
    ref = ActorRef(actor.name, send, _scope=anyio.CancelScope(shield=True))
    register(ref)  # before started(): a start() cancelled right now must not lose the actor
    task_status.started(ref)
    cause: BaseException | None = None
    try:
        with ref._scope, receive:
            await actor.run(receive)
    except BaseException as exc:
        cause = exc
        known = first_dlkeeper_error(exc)
        if isinstance(known, ConfigError):
            pass  # a bad setting: `dlkeeper serve` says so in one line, nothing to add here
        elif known is not None:  # an error dlkeeper knows how to explain needs no traceback
            log.error("actor %s failed: %s", actor.name, known)
        elif not isinstance(exc, anyio.get_cancelled_exc_class()):
            log.exception("actor %s failed", actor.name)
        raise
    finally:
        # Every ask queued or in progress is in ref._pending: it fails now, not at its deadline.
        ref._mark_dead(cause)
        try:
            with anyio.CancelScope(shield=True):
                await actor.on_stop()
        finally:
            ref._finished.set()


class ActorGroup:
    """Starts actors in order and stops them in reverse order; one failing actor stops the group.

    Made by `actor_group()`: its actors ignore the task group's cancellation and end only when
    `stop_all()` (or `stop()`) stops them.
    """

    def __init__(self, task_group: TaskGroup, stop_timeout: float) -> None:
        self._task_group = task_group
        self._stop_timeout = stop_timeout
        self._refs: list[ActorRef[Any]] = []

    async def start(
        self, actor: Actor[M], *, mailbox_size: int = DEFAULT_MAILBOX_SIZE
    ) -> ActorRef[M]:
        """Starts `actor` and returns its ref once `on_start()` has finished."""
        ref: ActorRef[M] = await self._task_group.start(
            _run_actor, actor, mailbox_size, self._refs.append
        )
        return ref

    async def stop_all(self) -> None:
        """Stops every actor, last started first; each gets `stop_timeout` to finish its inbox."""
        with anyio.CancelScope(shield=True):
            for ref in reversed(self._refs):
                await stop(ref, self._stop_timeout)
            self._refs.clear()


async def stop(ref: ActorRef[Any], timeout: float) -> None:
    """Closes the actor's mailbox and waits for it to finish what is queued.

    An actor that has not ended after `timeout` seconds is cancelled.
    """
    await ref._mailbox.aclose()
    with anyio.move_on_after(timeout):
        await ref.wait_finished()
        return
    log.warning("actor %s did not stop within %g s; cancelling it", ref.name, timeout)
    ref._scope.cancel()
    await ref.wait_finished()


@asynccontextmanager
async def actor_group(stop_timeout: float = 10.0) -> AsyncIterator[ActorGroup]:
    """A task group of actors that are stopped in reverse start order on exit."""
    async with anyio.create_task_group() as task_group:
        group = ActorGroup(task_group, stop_timeout)
        try:
            yield group
        finally:
            try:
                await group.stop_all()
            finally:
                task_group.cancel_scope.cancel()


@dataclass
class _KeyedEntry:
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0


class KeyedLock:
    """A lock per key, made when first needed and dropped when nobody holds or awaits it:
    `hold(key)` runs its block after every earlier holder of the same key, in the order they
    came (anyio's locks are fair), while other keys go on at the same time."""

    def __init__(self) -> None:
        self._entries: dict[object, _KeyedEntry] = {}

    @asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        entry = self._entries.setdefault(key, _KeyedEntry())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]

    def __len__(self) -> int:
        """How many keys are held or awaited now."""
        return len(self._entries)


def expect(reply: object, kind: type[T]) -> T:
    """`reply` as a `kind`; an actor answering with anything else is a bug in dlkeeper."""
    if not isinstance(reply, kind):
        raise DlkeeperError(f"expected a {kind.__name__}, got {type(reply).__name__}")
    return reply
