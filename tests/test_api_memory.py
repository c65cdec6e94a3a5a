"""What the daemon holds for requests in flight is bounded in bytes, not only in number: many
pipelined adds of a large .torrent wait their turn instead of each being read, decoded and kept
at once (issue 10, item 9). Then the byte budget itself (actors.budget)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.budget import ByteBudget, HeldBytes, held_bytes
from supervisor.api import TORRENT_BYTES_IN_FLIGHT
from tests.api import MiB, code_of, line, make_library
from tests.daemons import RawClient, running_daemon

CONNECTIONS = 2
ADDS = 32  # in all, over CONNECTIONS connections, each connection's sent in one write
PIECES = 2_000_000  # 20 bytes of hash each: a .torrent of 38 MiB, quick to make and decode
PIECE_LENGTH = 16 * 1024
TIME_LIMIT = 30.0  # for all the replies; they take about 8 s
# The codes an add may be refused with here: the torrent is one, so every add after the first
# is a duplicate of it (found once it is read and decoded, which is what costs the memory).
REFUSALS = {"duplicate", "no_space", "not_ready"}
# What a .torrent held costs beyond its own bytes: the decoder copies its pieces and hashes a
# copy of its info dictionary, and the session keeps the last add it was sent (its base64).
# Every add reading its own copy at once, as before the budget, costs gigabytes.
COST_PER_BUDGETED_BYTE = 5


def huge_torrent(path: Path) -> int:
    """Writes a valid single-file .torrent of PIECES pieces at `path`: its size in bytes."""
    info = b"d6:lengthi%de4:name8:huge.bin12:piece lengthi%de6:pieces%d:" % (
        PIECES * PIECE_LENGTH,
        PIECE_LENGTH,
        PIECES * 20,
    )
    path.write_bytes(b"d4:info" + info + os.urandom(PIECES * 20) + b"ee")
    return path.stat().st_size


def memory_of(pid: int, field: str) -> int:
    """A field of /proc/PID/status given in kB (VmRSS, VmHWM), in bytes."""
    for entry in Path(f"/proc/{pid}/status").read_text().splitlines():
        if entry.startswith(f"{field}:"):
            return int(entry.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def add_lines(torrent: Path, connection: int, count: int) -> bytes:
    return b"".join(
        line(
            {
                "id": index,
                "op": "add",
                "torrent_path": str(torrent),
                "task_id": f"huge-{connection}-{index}",
                "paused": True,
            }
        )
        for index in range(count)
    )


def read_replies(client: RawClient, count: int, replies: list[dict[str, Any]]) -> None:
    for _ in range(count):
        replies.append(client.read_reply())


def test_pipelined_adds_of_a_large_torrent_keep_the_daemon_s_memory_bounded(
    tmp_path: Path,
) -> None:
    library = make_library(tmp_path)
    torrent = tmp_path / "huge.torrent"
    size = huge_torrent(torrent)
    per_connection = ADDS // CONNECTIONS
    with running_daemon(library.config) as daemon:
        pid = daemon.process.pid
        baseline = memory_of(pid, "VmRSS")
        clients = [RawClient(daemon.socket, timeout=TIME_LIMIT) for _ in range(CONNECTIONS)]
        replies: list[list[dict[str, Any]]] = [[] for _ in clients]
        readers = [
            threading.Thread(target=read_replies, args=(client, per_connection, got), daemon=True)
            for client, got in zip(clients, replies, strict=True)
        ]
        try:
            started = time.monotonic()
            for reader in readers:
                reader.start()
            for number, client in enumerate(clients):
                client.send_raw(add_lines(torrent, number, per_connection))
            deadline = started + TIME_LIMIT
            for reader in readers:
                reader.join(max(deadline - time.monotonic(), 0))
            elapsed = time.monotonic() - started
        finally:
            for client in clients:
                client.close()  # a reader still waiting ends with the connection
        peak = memory_of(pid, "VmHWM")
        assert daemon.process.poll() is None, "the daemon exited"
    print(
        f"{ADDS} pipelined adds of a {size / MiB:.0f} MiB .torrent answered in {elapsed:.1f} s; "
        f"daemon RSS {baseline / MiB:.0f} MiB at start, peak {peak / MiB:.0f} MiB"
    )
    for got in replies:
        assert sorted(reply["id"] for reply in got) == list(range(per_connection)), got
        for reply in got:
            assert reply["ok"] is True or code_of(reply) in REFUSALS, reply
    bound = baseline + COST_PER_BUDGETED_BYTE * TORRENT_BYTES_IN_FLIGHT
    assert peak < bound, f"peak RSS {peak / MiB:.0f} MiB, over {bound / MiB:.0f} MiB"


# --- the budget ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_charges_past_the_capacity_wait_and_are_let_in_in_the_order_they_came() -> None:
    budget = ByteBudget(100)
    admitted: list[str] = []

    async def charge(name: str, size: int) -> None:
        await budget.acquire(size)
        admitted.append(name)

    await budget.acquire(60)
    async with anyio.create_task_group() as tasks:
        for name, size in (("large", 90), ("small", 10)):
            tasks.start_soon(charge, name, size)
            await anyio.wait_all_tasks_blocked()
        # The small one would fit now, but it came after the large one, which must not starve.
        assert (admitted, budget.waiting) == ([], 2)
        budget.release(60)
    assert admitted == ["large", "small"]
    assert budget.held == 100


@pytest.mark.anyio
async def test_a_charge_larger_than_the_capacity_is_served_alone() -> None:
    budget = ByteBudget(100)
    await budget.acquire(1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(budget.acquire, 500)
            await anyio.wait_all_tasks_blocked()
            assert budget.waiting == 1
            budget.release(1)
    assert budget.held == 500  # alone: nothing else fits until it is given back
    budget.release(500)
    assert budget.held == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_its_place_to_those_behind_it() -> None:
    budget = ByteBudget(100)
    await budget.acquire(50)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            waiting = anyio.CancelScope()
            tasks.start_soon(_acquire_in, waiting, budget, 80)
            await anyio.wait_all_tasks_blocked()
            tasks.start_soon(budget.acquire, 40)
            await anyio.wait_all_tasks_blocked()
            assert budget.waiting == 2
            waiting.cancel()
    assert budget.held == 90  # the 40 behind the cancelled 80 got in; the 80 holds nothing


async def _acquire_in(scope: anyio.CancelScope, budget: ByteBudget, size: int) -> None:
    with scope:
        await budget.acquire(size)


@pytest.mark.anyio
async def test_what_a_request_holds_is_given_back_together_and_once() -> None:
    lines, torrents = ByteBudget(100), ByteBudget(100)
    held = HeldBytes()
    await held.take(lines, 30)
    with held.serving():
        await held_bytes().take(torrents, 70)
        held_bytes().take_nowait(torrents, 50)  # past the capacity: already in memory
    assert (held.size, lines.held, torrents.held) == (150, 30, 120)
    held.release()
    held.release()
    assert (held.size, lines.held, torrents.held) == (0, 0, 0)
    with pytest.raises(RuntimeError, match="no request is being served"):
        held_bytes()
