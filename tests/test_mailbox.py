"""The actor kit: tell/ask over bounded mailboxes, ordered start, reverse stop, death of an actor.

Every test drives a `ScriptedActor` whose messages say what it does; a `Gate` holds it inside one
message until the test opens it, so the tests synchronise on events, never on sleeps.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.errors import ActorDied, AskTimeout, DlkeeperError, MailboxFull
from actors.mailbox import (
    Actor,
    ActorRef,
    Envelope,
    KeyedLock,
    Reply,
    actor_group,
    expect,
    stop,
)

pytestmark = pytest.mark.anyio

LONG_DEADLINE = 30.0  # an ask that must fail long before this has failed promptly
TEST_DEADLINE = 5.0  # every test is over well within this; a hang fails fast


class Gate:
    """Holds an actor inside a `Hold` message: `entered` once it is there, `opened` lets it go."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.opened = anyio.Event()


@dataclass(frozen=True)
class Record:
    """Noted in `handled`; an ask is answered with `text`."""

    text: str


@dataclass(frozen=True)
class Refuse:
    """An ask is answered with `error` (`Reply.fail`)."""

    error: Exception


@dataclass(frozen=True)
class Hold:
    """Waits at `gate`; then raises `then_raise` (a crash) or answers "held"."""

    gate: Gate
    then_raise: Exception | None = None


@dataclass(frozen=True)
class Crash:
    """Ends the actor by raising `error`."""

    error: Exception


@dataclass(frozen=True)
class Ignore:
    """Noted in `handled` and never answered."""

    text: str


Message = Record | Refuse | Hold | Crash | Ignore


@dataclass(eq=False)
class ScriptedActor(Actor[Message]):
    """Does what each message says; `journal` (shareable between actors) records its lifecycle."""

    name: str = "scripted"
    journal: list[str] = field(default_factory=list)
    start_error: Exception | None = None
    slow_stop: bool = False
    handled: list[str] = field(default_factory=list)
    ready: bool = False

    async def on_start(self) -> None:
        await anyio.lowlevel.checkpoint()  # a real await: start() must wait past it
        if self.start_error is not None:
            raise self.start_error
        self.ready = True
        self.journal.append(f"{self.name} started")

    async def run(self, inbox: MemoryObjectReceiveStream[Envelope[Message]]) -> None:
        self.journal.append(f"{self.name} running")
        async for envelope in inbox:
            await self._handle(envelope.message, envelope.reply)

    async def on_stop(self) -> None:
        self.journal.append(f"{self.name} stopping")
        if self.slow_stop:
            # Lets every other task run first: anything not waiting for this on_stop goes ahead.
            await anyio.wait_all_tasks_blocked()
        self.journal.append(f"{self.name} stopped")

    async def _handle(self, message: Message, reply: Reply | None) -> None:
        match message:
            case Record(text):
                self.handled.append(text)
                if reply is not None:
                    reply.send(text)
            case Refuse(error):
                if reply is not None:
                    reply.fail(error)
            case Hold(gate, then_raise):
                gate.entered.set()
                try:
                    await gate.opened.wait()
                except anyio.get_cancelled_exc_class():
                    self.handled.append("cancelled while holding")
                    raise
                if then_raise is not None:
                    raise then_raise
                self.handled.append("held")
                if reply is not None:
                    reply.send("held")
            case Crash(error):
                raise error
            case Ignore(text):
                self.handled.append(text)


async def ask_text(ref: ActorRef[Message], message: Message, timeout: float = 5.0) -> str:
    return expect(await ref.ask(message, timeout=timeout), str)


async def ask_and_keep_error(
    ref: ActorRef[Message], message: Message, errors: list[BaseException]
) -> None:
    """Asks with a long deadline; the error the ask ends with goes to `errors`."""
    try:
        await ref.ask(message, timeout=LONG_DEADLINE)
    except Exception as error:
        errors.append(error)
    else:
        errors.append(AssertionError(f"{message} was answered"))


def raises_group_of(error: Exception) -> pytest.RaisesGroup[Exception]:
    """An actor group failing with exactly `error` (this instance), possibly nested."""
    return pytest.RaisesGroup(
        pytest.RaisesExc(type(error), check=lambda raised: raised is error),
        flatten_subgroups=True,
    )


async def crashed_actor(error: Exception) -> ActorRef[Message]:
    """The ref of an actor that crashed with `error` (its group has ended)."""
    with raises_group_of(error):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            await ref.tell(Crash(error))
            await anyio.sleep_forever()  # the crash cancels this
    assert not ref.alive
    return ref


async def stopped_actor() -> ActorRef[Message]:
    """The ref of an actor that was stopped cleanly."""
    async with actor_group(stop_timeout=1) as group:
        ref = await group.start(ScriptedActor())
        await stop(ref, timeout=1)
    assert not ref.alive
    return ref


# --- tell and ask -------------------------------------------------------------------------------


async def test_tell_delivers_messages_in_order() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            actor = ScriptedActor()
            ref = await group.start(actor)
            texts = [f"message {number}" for number in range(50)]
            for text in texts:
                await ref.tell(Record(text))
            await ask_text(ref, Record("last"))  # handled after everything told before it
        assert actor.handled == [*texts, "last"]


async def test_ask_returns_the_actors_answer() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            assert await ref.ask(Record("hello"), timeout=5) == "hello"


async def test_concurrent_asks_each_get_their_own_answer() -> None:
    answers: dict[str, str] = {}

    async def ask_one(ref: ActorRef[Message], text: str) -> None:
        answers[text] = await ask_text(ref, Record(text))

    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            async with anyio.create_task_group() as askers:
                for number in range(20):
                    askers.start_soon(ask_one, ref, f"ask {number}")
    assert answers == {f"ask {number}": f"ask {number}" for number in range(20)}


async def test_error_answer_raises_in_the_asker() -> None:
    refusal = DlkeeperError("refused")
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            with pytest.raises(DlkeeperError) as raised:
                await ref.ask(Refuse(refusal), timeout=5)
            assert raised.value is refusal
            assert ref.alive  # an error answer is an answer, not a crash


async def test_timeout_error_answered_by_the_actor_is_not_an_ask_timeout() -> None:
    answer = TimeoutError("the disk did not answer")
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            with pytest.raises(TimeoutError) as raised:
                await ref.ask(Refuse(answer), timeout=LONG_DEADLINE)
            assert raised.value is answer


async def test_reply_keeps_its_first_answer() -> None:
    reply = Reply()
    assert not reply.answered
    reply.send("first")
    reply.send("second")
    reply.fail(DlkeeperError("too late"))
    assert reply.answered
    assert await reply.wait() == "first"


# --- deadlines ----------------------------------------------------------------------------------


async def test_ask_past_its_deadline_raises_ask_timeout_naming_the_actor() -> None:
    gate = Gate()
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor(name="slowpoke"))
            with pytest.raises(AskTimeout) as raised:
                await ref.ask(Hold(gate), timeout=0.05)
            assert raised.value.actor == "slowpoke"
            assert "slowpoke" in str(raised.value)
            assert "Hold" in str(raised.value)
            gate.opened.set()


async def test_actor_keeps_working_after_an_ask_times_out() -> None:
    gate = Gate()
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            actor = ScriptedActor()
            ref = await group.start(actor)
            with pytest.raises(AskTimeout):
                await ref.ask(Hold(gate), timeout=0.05)
            gate.opened.set()  # the actor now answers an ask nobody waits for any more
            assert await ask_text(ref, Record("after")) == "after"
            assert ref.alive
        assert actor.handled == ["held", "after"]


# --- bounded mailbox ----------------------------------------------------------------------------


async def test_tell_nowait_raises_mailbox_full_when_the_mailbox_is_full() -> None:
    gate = Gate()
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            actor = ScriptedActor(name="busy")
            ref = await group.start(actor, mailbox_size=2)
            await ref.tell(Hold(gate))
            await gate.entered.wait()  # the actor holds; its mailbox is empty
            ref.tell_nowait(Record("a"))
            ref.tell_nowait(Record("b"))
            with pytest.raises(MailboxFull) as raised:
                ref.tell_nowait(Record("c"))
            assert raised.value.actor == "busy"
            gate.opened.set()
        assert actor.handled == ["held", "a", "b"]


async def test_tell_waits_for_room_when_the_mailbox_is_full() -> None:
    gate = Gate()
    delivered = anyio.Event()

    async def tell_when_there_is_room(ref: ActorRef[Message]) -> None:
        await ref.tell(Record("waited"))
        delivered.set()

    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            actor = ScriptedActor()
            ref = await group.start(actor, mailbox_size=1)
            await ref.tell(Hold(gate))
            await gate.entered.wait()
            ref.tell_nowait(Record("queued"))  # the mailbox is now full
            async with anyio.create_task_group() as tellers:
                tellers.start_soon(tell_when_there_is_room, ref)
                await anyio.wait_all_tasks_blocked()
                assert not delivered.is_set()  # blocked on the full mailbox
                gate.opened.set()  # the actor takes "queued": there is room
                await delivered.wait()
            await ask_text(ref, Record("last"))
        assert actor.handled == ["held", "queued", "waited", "last"]


# --- start --------------------------------------------------------------------------------------


async def test_on_start_finishes_before_start_returns_the_ref() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            actor = ScriptedActor()
            ref = await group.start(actor)
            assert actor.ready
            assert actor.journal[0] == "scripted started"
            assert ref.alive
            assert await ask_text(ref, Record("usable")) == "usable"


async def test_start_raises_the_error_from_on_start() -> None:
    failure = DlkeeperError("cannot start")
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            with pytest.raises(DlkeeperError) as raised:
                await group.start(ScriptedActor(start_error=failure))
            assert raised.value is failure


async def test_actor_does_not_run_when_on_start_fails() -> None:
    actor = ScriptedActor(start_error=DlkeeperError("cannot start"))
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            with pytest.raises(DlkeeperError):
                await group.start(actor)
            # The group carries on: a failed start is the caller's error, not a crash.
            other = await group.start(ScriptedActor(name="other"))
            assert await ask_text(other, Record("still fine")) == "still fine"
        assert not actor.ready
        assert "scripted running" not in actor.journal


async def test_on_stop_does_not_run_when_on_start_fails() -> None:
    actor = ScriptedActor(start_error=DlkeeperError("cannot start"))
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            with pytest.raises(DlkeeperError):
                await group.start(actor)
        assert actor.journal == []


# --- stop ---------------------------------------------------------------------------------------


async def test_actor_group_stops_actors_in_reverse_start_order() -> None:
    journal: list[str] = []
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            for name in ("first", "second", "third"):
                await group.start(ScriptedActor(name=name, journal=journal))
    stops = [entry for entry in journal if entry.endswith("stopping")]
    assert stops == ["third stopping", "second stopping", "first stopping"]


async def test_actor_group_stops_the_next_actor_only_after_on_stop_has_finished() -> None:
    journal: list[str] = []
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            for name in ("first", "second"):
                await group.start(ScriptedActor(name=name, journal=journal, slow_stop=True))
    assert journal[-4:] == [
        "second stopping",
        "second stopped",
        "first stopping",
        "first stopped",
    ]


async def test_on_stop_runs_when_the_group_is_cancelled() -> None:
    actors = [ScriptedActor(name=name) for name in ("first", "second")]
    with anyio.fail_after(TEST_DEADLINE):
        with anyio.CancelScope() as outer:
            async with actor_group(stop_timeout=1) as group:
                for actor in actors:
                    await group.start(actor)
                outer.cancel()
                await anyio.sleep_forever()  # the cancellation ends this
        assert outer.cancelled_caught
    for actor in actors:
        assert actor.journal[-1] == f"{actor.name} stopped"


async def test_cancelled_group_stops_actors_in_reverse_start_order() -> None:
    journal: list[str] = []
    with anyio.fail_after(TEST_DEADLINE):
        with anyio.CancelScope() as outer:
            async with actor_group(stop_timeout=1) as group:
                for name in ("first", "second", "third"):
                    await group.start(ScriptedActor(name=name, journal=journal, slow_stop=True))
                outer.cancel()
                await anyio.sleep_forever()
    assert [entry for entry in journal if "stop" in entry] == [
        "third stopping",
        "third stopped",
        "second stopping",
        "second stopped",
        "first stopping",
        "first stopped",
    ]


async def test_cancelled_group_lets_actors_finish_queued_messages() -> None:
    gate = Gate()
    actor = ScriptedActor()
    with anyio.fail_after(TEST_DEADLINE):
        with anyio.CancelScope() as outer:
            async with actor_group(stop_timeout=1) as group:
                ref = await group.start(actor)
                await ref.tell(Hold(gate))
                await gate.entered.wait()
                await ref.tell(Record("queued"))
                outer.cancel()
                gate.opened.set()
                await anyio.sleep_forever()
    assert actor.handled == ["held", "queued"]


async def test_crash_stops_the_other_actors_in_reverse_start_order() -> None:
    journal: list[str] = []
    boom = RuntimeError("boom")
    with anyio.fail_after(TEST_DEADLINE), raises_group_of(boom):
        async with actor_group(stop_timeout=1) as group:
            refs = [
                await group.start(ScriptedActor(name=name, journal=journal, slow_stop=True))
                for name in ("first", "second", "third", "fourth")
            ]
            await refs[1].tell(Crash(boom))
            await anyio.sleep_forever()
    others = [entry for entry in journal if "stop" in entry and not entry.startswith("second")]
    assert others == [
        "fourth stopping",
        "fourth stopped",
        "third stopping",
        "third stopped",
        "first stopping",
        "first stopped",
    ]


async def test_stop_lets_the_actor_finish_messages_already_queued() -> None:
    gate = Gate()
    actor = ScriptedActor()
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(actor)
            await ref.tell(Hold(gate))
            await gate.entered.wait()
            await ref.tell(Record("a"))
            await ref.tell(Record("b"))
            async with anyio.create_task_group() as stopper:
                stopper.start_soon(stop, ref, 5.0)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(ActorDied):  # the mailbox is closed: the stop has begun
                    ref.tell_nowait(Record("too late"))
                gate.opened.set()
            assert not ref.alive
    assert actor.handled == ["held", "a", "b"]


async def test_stop_answers_asks_already_queued() -> None:
    gate = Gate()
    answers: list[str] = []

    async def ask_queued(ref: ActorRef[Message]) -> None:
        answers.append(await ask_text(ref, Record("queued ask")))

    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            await ref.tell(Hold(gate))
            await gate.entered.wait()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(ask_queued, ref)
                await anyio.wait_all_tasks_blocked()  # the ask is in the mailbox
                tasks.start_soon(stop, ref, 5.0)
                await anyio.wait_all_tasks_blocked()
                gate.opened.set()
    assert answers == ["queued ask"]


async def test_actor_that_outlives_the_stop_timeout_is_cancelled() -> None:
    gate = Gate()  # never opened: the actor would hold forever
    actor = ScriptedActor()
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(actor)
            await ref.tell(Hold(gate))
            await gate.entered.wait()
            await stop(ref, timeout=0.05)
            assert not ref.alive
    assert actor.handled == ["cancelled while holding"]
    assert actor.journal[-1] == "scripted stopped"


async def test_wait_finished_returns_once_the_actor_has_stopped() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with actor_group(stop_timeout=1) as group:
            actor = ScriptedActor()
            ref = await group.start(actor)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(stop, ref, 5.0)
                await ref.wait_finished()
            assert not ref.alive
            assert actor.journal[-1] == "scripted stopped"


# --- death --------------------------------------------------------------------------------------


async def test_pending_ask_fails_when_actor_crashes_while_handling_it() -> None:
    gate = Gate()
    boom = RuntimeError("boom")
    errors: list[BaseException] = []
    with anyio.fail_after(TEST_DEADLINE):  # far below the ask's own deadline
        async with anyio.create_task_group() as askers:
            with raises_group_of(boom):
                async with actor_group(stop_timeout=1) as group:
                    ref = await group.start(ScriptedActor(name="fragile"))
                    askers.start_soon(ask_and_keep_error, ref, Hold(gate, then_raise=boom), errors)
                    await gate.entered.wait()
                    gate.opened.set()
                    await anyio.sleep_forever()  # the crash cancels this
    [error] = errors
    assert isinstance(error, ActorDied)
    assert error.cause is boom
    assert error.actor == "fragile"
    assert "boom" in str(error)


async def test_queued_asks_fail_when_actor_crashes_on_another_message() -> None:
    gate = Gate()
    boom = RuntimeError("boom")
    errors: list[BaseException] = []
    with anyio.fail_after(TEST_DEADLINE):  # far below the asks' own deadline
        async with anyio.create_task_group() as askers:
            with raises_group_of(boom):
                async with actor_group(stop_timeout=1) as group:
                    ref = await group.start(ScriptedActor(name="fragile"))
                    await ref.tell(Hold(gate, then_raise=boom))
                    await gate.entered.wait()
                    for text in ("first", "second"):
                        askers.start_soon(ask_and_keep_error, ref, Record(text), errors)
                    await anyio.wait_all_tasks_blocked()  # both asks wait in the mailbox
                    assert errors == []
                    gate.opened.set()
                    await anyio.sleep_forever()
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, ActorDied)
        assert error.cause is boom
        assert error.actor == "fragile"


async def test_ask_blocked_on_a_full_mailbox_fails_when_actor_crashes() -> None:
    gate = Gate()
    boom = RuntimeError("boom")
    errors: list[BaseException] = []
    with anyio.fail_after(TEST_DEADLINE):
        async with anyio.create_task_group() as askers:
            with raises_group_of(boom):
                async with actor_group(stop_timeout=1) as group:
                    ref = await group.start(ScriptedActor(), mailbox_size=1)
                    await ref.tell(Hold(gate, then_raise=boom))
                    await gate.entered.wait()
                    ref.tell_nowait(Record("fills the mailbox"))
                    askers.start_soon(ask_and_keep_error, ref, Record("blocked"), errors)
                    await anyio.wait_all_tasks_blocked()
                    gate.opened.set()
                    await anyio.sleep_forever()
    [error] = errors
    assert isinstance(error, ActorDied)
    assert error.cause is boom


async def test_unanswered_ask_fails_when_the_actor_stops() -> None:
    errors: list[BaseException] = []
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            anyio.create_task_group() as askers,
            actor_group(stop_timeout=1) as group,
        ):
            actor = ScriptedActor()
            ref = await group.start(actor)
            askers.start_soon(ask_and_keep_error, ref, Ignore("dropped"), errors)
            await anyio.wait_all_tasks_blocked()
            assert actor.handled == ["dropped"]
    [error] = errors
    assert isinstance(error, ActorDied)
    assert error.cause is None


async def test_tell_to_a_crashed_actor_raises_actor_died_at_once() -> None:
    boom = RuntimeError("boom")
    with anyio.fail_after(TEST_DEADLINE):
        ref = await crashed_actor(boom)
    with anyio.fail_after(1), pytest.raises(ActorDied) as raised:
        await ref.tell(Record("hello?"))
    assert raised.value.cause is boom


async def test_tell_nowait_to_a_crashed_actor_raises_actor_died() -> None:
    boom = RuntimeError("boom")
    with anyio.fail_after(TEST_DEADLINE):
        ref = await crashed_actor(boom)
    with pytest.raises(ActorDied) as raised:
        ref.tell_nowait(Record("hello?"))
    assert raised.value.cause is boom


async def test_ask_to_a_crashed_actor_raises_actor_died_at_once() -> None:
    boom = RuntimeError("boom")
    with anyio.fail_after(TEST_DEADLINE):
        ref = await crashed_actor(boom)
    with anyio.fail_after(1), pytest.raises(ActorDied) as raised:
        await ref.ask(Record("hello?"), timeout=LONG_DEADLINE)
    assert raised.value.cause is boom


async def test_tell_to_a_stopped_actor_raises_actor_died_at_once() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        ref = await stopped_actor()
    with anyio.fail_after(1), pytest.raises(ActorDied) as raised:
        await ref.tell(Record("hello?"))
    assert raised.value.cause is None


async def test_ask_to_a_stopped_actor_raises_actor_died_at_once() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        ref = await stopped_actor()
    with anyio.fail_after(1), pytest.raises(ActorDied) as raised:
        await ref.ask(Record("hello?"), timeout=LONG_DEADLINE)
    assert raised.value.cause is None


async def test_repeated_calls_to_a_dead_actor_do_not_pile_up_tracebacks() -> None:
    with anyio.fail_after(TEST_DEADLINE):
        ref = await crashed_actor(RuntimeError("boom"))
    depths = []
    for _ in range(3):
        with pytest.raises(ActorDied) as raised:
            ref.tell_nowait(Record("hello?"))
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    assert depths[0] == depths[1] == depths[2]


async def test_actor_crash_propagates_out_of_the_actor_group() -> None:
    boom = RuntimeError("boom")
    with anyio.fail_after(TEST_DEADLINE), raises_group_of(boom):
        async with actor_group(stop_timeout=1) as group:
            ref = await group.start(ScriptedActor())
            await group.start(ScriptedActor(name="bystander"))
            await ref.tell(Crash(boom))
            await anyio.sleep_forever()  # the crash must cancel this, or the deadline fails


# --- expect -------------------------------------------------------------------------------------


def test_expect_returns_a_reply_of_the_expected_type() -> None:
    reply: object = "an answer"
    assert expect(reply, str) == "an answer"


def test_expect_raises_dlkeeper_error_for_a_reply_of_another_type() -> None:
    with pytest.raises(DlkeeperError, match="expected a str, got int"):
        expect(42, str)


async def test_keyed_lock_runs_holders_of_one_key_in_arrival_order_and_others_meanwhile() -> None:
    locks = KeyedLock()
    order: list[str] = []
    gate = anyio.Event()

    async def hold(key: str, name: str, *, wait: bool = False) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            if wait:
                await gate.wait()
            order.append(f"{name} out")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(hold, "a", "first", wait=True))
            await anyio.wait_all_tasks_blocked()
            for name in ("second", "third"):
                tasks.start_soon(hold, "a", name)
                await anyio.wait_all_tasks_blocked()
            tasks.start_soon(hold, "b", "other")  # another key does not wait for "a"
            await anyio.wait_all_tasks_blocked()
            assert order == ["first in", "other in", "other out"]
            assert len(locks) == 1
            gate.set()
    assert order[3:] == ["first out", "second in", "second out", "third in", "third out"]
    assert len(locks) == 0  # nothing kept for keys nobody holds
