"""The libtorrent worker as a child process, the way anyio's `to_process` runs one: spawned as
`python -m actors.session_worker`, a handshake under a deadline (`configure` answered by `ready`),
JSON lines both ways (commands with ids, replies typed per command, and events), and a kill with a
shielded reap on any failure of the transport. What to do with a worker is the session actor's
business (`actors.session`); this module only carries it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import orjson
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from pydantic import ValidationError

from actors.errors import ConfigError, DlkeeperError, WorkerGone, WorkerTimeout, error_from_body
from actors.mailbox import Reply, expect
from actors.messages.base import Message
from actors.messages.worker import (
    WORKER_OUTPUT,
    ConfigureSession,
    SettingsRejected,
    WorkerCommand,
    WorkerReady,
    WorkerReply,
    WorkerResult,
)

log = logging.getLogger(__name__)

C = TypeVar("C", bound=WorkerCommand)
R = TypeVar("R")

MAX_LINE_BYTES = 256 * 1024 * 1024  # resume data of a huge v2 torrent can be tens of MiB
WORKER_MODULE = "actors.session_worker"
WORKER_COMMAND = (sys.executable, "-m", WORKER_MODULE)


@asynccontextmanager
async def spawn_worker(
    command: Sequence[str],
    events: MemoryObjectSendStream[Message],
    *,
    exit_grace: Callable[[], float] = lambda: 0.0,
) -> AsyncIterator[WorkerProcess]:
    """Starts the worker `command` and carries its input and output while the block runs; its
    events go to `events`. On leaving, the worker is given `exit_grace()` seconds to exit by
    itself (a worker told to stop is writing what it holds), then killed and reaped."""
    process = await anyio.open_process(list(command), stderr=None, start_new_session=True)
    worker = WorkerProcess(process, events)
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(worker.read_output)
            task_group.start_soon(worker.write_input)
            yield worker
            task_group.cancel_scope.cancel()
    finally:
        grace = exit_grace()
        if grace > 0:
            with anyio.CancelScope(shield=True), anyio.move_on_after(grace):
                await process.wait()
        await worker.kill()


@dataclass
class _InputBatch:
    """Commands for the worker that go out in one write; `written` is set once it is done."""

    lines: list[bytes] = field(default_factory=list)
    written: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None


class WorkerProcess:
    """A running worker: its process, its requests in flight, and the reader of its output."""

    def __init__(self, process: Process, events: MemoryObjectSendStream[Message]) -> None:
        self.process = process
        self.exited = anyio.Event()
        self.exit_reason = "running"
        self._events = events
        self._ids = itertools.count(1)
        self._pending: dict[int, Reply] = {}
        self._configured = Reply()
        self._unsent = _InputBatch()
        self._input_wanted = anyio.Event()
        self._input_closed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    async def read_output(self) -> None:
        """Reads replies and events until the worker's stdout closes; then fails what waits."""
        assert self.process.stdout is not None
        stream = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                self._dispatch(await stream.receive_until(b"\n", MAX_LINE_BYTES))
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError):
            self.exit_reason = "its output closed"
        except anyio.BrokenResourceError:
            self.exit_reason = "its output broke"
        except anyio.DelimiterNotFound:
            self.exit_reason = "it wrote a line longer than the limit"
        finally:
            gone = WorkerGone(f"the libtorrent worker is gone: {self.exit_reason}")
            for reply in self._pending.values():
                reply.fail(gone)
            self._pending.clear()
            self._configured.fail(gone)
            self.exited.set()

    def _dispatch(self, line: bytes) -> None:
        try:
            output = WORKER_OUTPUT.validate_json(line)
        except ValidationError as exc:
            log.error("worker wrote a malformed line (%s): %.200r", exc.errors()[0]["msg"], line)
            self._fail_malformed_reply(line)
            return
        if isinstance(output, WorkerReply):
            if output.id == 0:  # the answer to `configure`, when it failed
                self._configured.send(output)
            reply = self._pending.pop(output.id, None)
            if reply is not None:
                reply.send(output)
        elif isinstance(output, WorkerReady | SettingsRejected):
            self._configured.send(output)
        else:
            self._events.send_nowait(output)

    def _fail_malformed_reply(self, line: bytes) -> None:
        """A reply not shaped as promised fails its request at once (not after its deadline)."""
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(line)
            request_id = data.get("id") if isinstance(data, dict) else None
            reply = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if reply is not None:
                reply.fail(DlkeeperError("the libtorrent worker answered with a malformed reply"))

    async def configure(
        self, settings: Mapping[str, str | int | bool], timeout: float
    ) -> WorkerReady:
        """Starts the session; raises `ConfigError` for a bad [libtorrent] setting."""
        with anyio.move_on_after(timeout):
            await self._send(ConfigureSession(id=0, settings=dict(settings)))
            answer = await self._configured.wait()
            if isinstance(answer, SettingsRejected):
                raise ConfigError(f"libtorrent.{answer.key}", answer.reason)
            if isinstance(answer, WorkerReply):
                message = answer.error.message if answer.error else "no reason given"
                raise WorkerGone(f"the libtorrent worker failed to start its session: {message}")
            return expect(answer, WorkerReady)
        raise WorkerTimeout(f"the libtorrent worker did not get ready within {timeout:g} s")

    async def request(self, command: Callable[[int], C], timeout: float, kind: type[R]) -> R:
        """Sends `command(id)` and returns its reply's result, a `kind`; raises its error.

        `WorkerGone` when the worker died, `WorkerTimeout` when it did not answer in time.
        """
        if self.exited.is_set():
            raise WorkerGone(f"the libtorrent worker is gone: {self.exit_reason}")
        request_id = next(self._ids)
        reply = Reply()
        self._pending[request_id] = reply
        try:
            # Sending is inside the deadline too: a worker that stopped reading fills the pipe.
            with anyio.move_on_after(timeout):
                await self._send(command(request_id))
                return expect(_result(expect(await reply.wait(), WorkerReply)), kind)
            # A worker that does not answer hangs: killed now, the session actor replaces it.
            self._signal(signal.SIGKILL)
            raise WorkerTimeout(f"the libtorrent worker did not answer within {timeout:g} s")
        finally:
            self._pending.pop(request_id, None)

    async def _send(self, command: WorkerCommand) -> None:
        """Hands the command to `write_input` and returns once it is written."""
        if self._input_closed:
            raise WorkerGone(f"the libtorrent worker is gone: {self.exit_reason}")
        batch = self._unsent
        batch.lines.append(command.model_dump_json().encode() + b"\n")
        self._input_wanted.set()
        await batch.written.wait()
        if batch.error is not None:
            raise WorkerGone(f"the libtorrent worker is gone: {batch.error}")

    async def write_input(self) -> None:
        """Writes commands to the worker's stdin, everything that waits in one write: many
        concurrent senders then cost one write, not a lock handed from one to the next."""
        assert self.process.stdin is not None
        try:
            while True:
                await self._input_wanted.wait()
                self._input_wanted = anyio.Event()
                batch, self._unsent = self._unsent, _InputBatch()
                try:
                    await self.process.stdin.send(b"".join(batch.lines))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    batch.error = exc
                except BaseException:
                    batch.error = RuntimeError("its input was closed")
                    raise
                finally:
                    batch.written.set()
        finally:
            self._input_closed = True
            self._unsent.error = RuntimeError("its input was closed")
            self._unsent.written.set()

    async def kill(self) -> None:
        """SIGKILL (works on a stopped process too) and reap."""
        with anyio.CancelScope(shield=True):
            self._signal(signal.SIGKILL)
            await self.process.wait()

    async def close(self, timeout: float) -> None:
        """Asks the worker to stop (stdin closed), then SIGTERM, then SIGKILL; always reaps."""
        with anyio.CancelScope(shield=True):
            if self.process.stdin is not None:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await self.process.stdin.aclose()
            for escalation in (signal.SIGTERM, signal.SIGKILL):
                with anyio.move_on_after(timeout):
                    await self.process.wait()
                    return
                log.warning("libtorrent worker did not stop; sending %s", escalation.name)
                self._signal(escalation)
            await self.process.wait()

    def _signal(self, signum: signal.Signals) -> None:
        # os.kill, not Process.kill(): that polls the child, which can reap it before asyncio's
        # child watcher does ("Unknown child process pid N, will report returncode 255").
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)


def _result(answer: WorkerReply) -> WorkerResult:
    """The result of a worker's reply, or its error raised as ours."""
    if answer.ok and answer.result is not None:
        return answer.result
    if answer.error is None:
        raise DlkeeperError("the libtorrent worker answered without a result or an error")
    if answer.error.traceback:
        log.error("libtorrent worker error: %s", answer.error.traceback)
    raise error_from_body(answer.error.code, answer.error.message, answer.error.task_id)
