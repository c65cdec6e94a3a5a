"""The child side of `test_persistence_crash`: a zygote that forks persistence actors to be killed.

Run as `python -m tests.crash_child`. It imports everything once, then for each `Command` line on
stdin forks a child that runs the persistence actor on the command's state folder and mutates
records from several concurrent workers until it is SIGKILLed. Forking saves an interpreter start
per kill; it is safe because the zygote never starts a thread or an event loop.

The zygote's stdout carries one JSON object a line: `{"ready": true}` once imported, then for
each command `{"pid": n}` and, once that child is reaped, `{"exited": n, "status": code}` (a
negative code is the signal that killed it). The child reports on the command's FIFO: first
`{"t": "started"}`, then for each mutation an `intent` line before it is sent and an `ack` line
once its reply (the promise that it is on disk) arrived.
"""

from __future__ import annotations

import json
import os
import random
import select
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

# anyio imports its asyncio backend at the first run(); done here, once, not in every child.
import anyio._backends._asyncio
import anyio.to_thread

from actors.mailbox import actor_group
from actors.messages.persistence import RecordChanges
from actors.persistence import Persistence, PersistenceActor
from actors.state import DownloadRecord, DownloadStatus, MigrationContext
from actors.statefile import StateStore

SLOTS_PER_WORKER = 4
REMOVE_CHANCE = 0.25
_UPDATABLE_FIELDS = ("progress", "status", "file_priorities", "peers", "error")
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Command:
    """One child to fork: the library's state folder, where to report, and its randomness."""

    state_dir: str
    fifo: str
    seed: int
    iteration: int
    workers: int

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Command:
        return cls(**json.loads(line))


def task_id_for(worker: int, slot: int) -> str:
    return f"w{worker}-s{slot}"


def owner_of(task_id: str) -> int:
    """The worker that alone may change `task_id` (so each worker has one mutation in flight)."""
    return int(task_id.removeprefix("w").split("-", 1)[0])


def migration_context(state_dir: Path) -> MigrationContext:
    return MigrationContext(download_path=state_dir.parent / "downloads")


def _new_record(rng: random.Random, task_id: str) -> DownloadRecord:
    info_hash = rng.randbytes(20).hex()
    return DownloadRecord(
        task_id=task_id,
        name=f"Show {rng.randrange(10_000)}",
        info_hash=info_hash,
        created_at=_EPOCH + timedelta(seconds=rng.randrange(10**6)),
        status=rng.choice(list(DownloadStatus)),
        magnet_link=f"magnet:?xt=urn:btih:{info_hash}",
        save_path="/library/downloads",
        file_priorities=tuple(rng.randrange(8) for _ in range(rng.randrange(6))),
        progress=round(rng.random(), 4),
    )


def _random_changes(rng: random.Random) -> RecordChanges:
    values: dict[str, Any] = {
        "progress": round(rng.random(), 4),
        "status": rng.choice(list(DownloadStatus)),
        "file_priorities": tuple(rng.randrange(8) for _ in range(rng.randrange(6))),
        "peers": tuple(f"10.0.{rng.randrange(256)}.{rng.randrange(256)}:6881" for _ in range(3)),
        "error": rng.choice([None, f"tracker said {rng.randrange(1000)}"]),
    }
    chosen = rng.sample(_UPDATABLE_FIELDS, rng.randrange(1, len(_UPDATABLE_FIELDS) + 1))
    return RecordChanges(**{name: values[name] for name in chosen})


async def _mutate_forever(
    persistence: Persistence,
    worker: int,
    owned: dict[str, DownloadRecord],
    rng: random.Random,
    report: Report,
) -> None:
    """Random adds, updates and removes on the worker's own slots, one at a time, until killed."""
    number = 0
    while True:
        task_id = task_id_for(worker, rng.randrange(SLOTS_PER_WORKER))
        intent: dict[str, Any] = {"t": "intent", "w": worker, "n": number, "task_id": task_id}
        if task_id not in owned:
            record = _new_record(rng, task_id)
            report({**intent, "op": "add", "record": record.model_dump(mode="json")})
            owned[task_id] = (await persistence.add(record)).record
        elif rng.random() < REMOVE_CHANCE:
            report({**intent, "op": "remove"})
            await persistence.remove(task_id)
            del owned[task_id]
        else:
            changes = _random_changes(rng)
            encoded = changes.model_dump(mode="json", exclude_unset=True)
            report({**intent, "op": "update", "changes": encoded})
            owned[task_id] = await persistence.update(task_id, changes)
        report({"t": "ack", "w": worker, "n": number})
        number += 1


async def _run_child(command: Command) -> None:
    # The test opened the FIFO for reading before sending the command, so this never blocks.
    fifo = os.open(command.fifo, os.O_WRONLY)

    def report(event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        # Up to PIPE_BUF bytes a write is atomic: a kill never leaves half a line.
        assert len(line) <= select.PIPE_BUF, line
        os.write(fifo, line)

    state_dir = Path(command.state_dir)
    store = StateStore(state_dir, migration_context(state_dir))
    async with actor_group() as group:
        persistence = Persistence(await group.start(PersistenceActor(store)))
        loaded = await persistence.snapshot()
        report({"t": "started"})
        async with anyio.create_task_group() as workers:
            for worker in range(command.workers):
                owned = {key: r for key, r in loaded.items() if owner_of(key) == worker}
                rng = random.Random(f"{command.seed}-{command.iteration}-{worker}")
                workers.start_soon(_mutate_forever, persistence, worker, owned, rng, report)


def _child(command: Command) -> None:
    """The forked child: never returns into the zygote's loop."""
    code = 1
    try:
        os.dup2(2, 1)  # stdout is the zygote's protocol; a stray print must not corrupt it
        anyio.run(_run_child, command)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _send(message: dict[str, Any]) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


def main() -> None:
    _send({"ready": True})
    for line in sys.stdin.buffer:  # ends when the test closes our stdin
        command = Command.from_line(line)
        # A fork copies only the calling thread; with another thread alive, a lock it held
        # would stay held forever in the child.
        assert threading.active_count() == 1, threading.enumerate()
        pid = os.fork()
        if pid == 0:
            _child(command)
        _send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
