"""The `add` preflight (`no_space`), and `problems` and `free_bytes` in `ping` and `stats`
(CONTRACT section 2), on the machine's real file system.

No test fills a disk: each daemon gets a `min_free_bytes` that leaves it a chosen room, the free
bytes measured just before it starts less that room. Sizes are large (a torrent's files are
half as large again as the room, or the room half as large again as them) so that what other
programs write or delete meanwhile changes no outcome. The torrents describe
files that are not on disk (nothing needs to be downloaded or checked), except where a test puts
them there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from tests.api import NO_QUEUE, Library, b64, code_of, error_of, line, new_id, wait_until
from tests.daemons import RawClient, running_daemon, write_config

pytestmark = pytest.mark.timeout(60)

GiB = 1 << 30
MiB = 1 << 20
SIZE = 2 * GiB  # of most torrents here
ON_DISK = 512 * MiB  # of the payload one test puts on disk (made before its room is measured)
TOLERANCE = 256 * MiB  # how far the free bytes may move while a test runs
PIECE = 16 * MiB


@dataclass(frozen=True)
class Torrent:
    """A .torrent of files that need not exist: the pieces' hashes are made up."""

    name: str
    data: bytes
    info_hash: str

    def add(self, client: RawClient, **params: Any) -> dict[str, Any]:
        return client.request("add", torrent_b64=b64(self.data), **params)


def fake_torrent(files: dict[str, int] | int) -> Torrent:
    """A torrent named afresh, of one file of `files` bytes or of `files` (path: size)."""
    name = new_id("space")
    info: dict[bytes, Any] = {b"name": name.encode(), b"piece length": PIECE}
    if isinstance(files, int):
        info[b"length"] = files
        total = files
    else:
        info[b"files"] = [
            {b"length": size, b"path": [part.encode() for part in path.split("/")]}
            for path, size in files.items()
        ]
        total = sum(files.values())
    info[b"pieces"] = os.urandom(20 * -(-total // PIECE))
    encoded_info = lt.bencode(info)
    torrent: dict[bytes, Any] = {b"info": info}
    data = lt.bencode(torrent)
    return Torrent(name, data, hashlib.sha1(encoded_info).hexdigest())


def free_bytes(path: Path) -> int:
    found = os.statvfs(path)
    return found.f_bavail * found.f_frsize


@dataclass(frozen=True)
class Tight:
    """A running daemon whose min_free_bytes leaves it about `room` bytes to add into."""

    library: Library
    socket: Path
    client: RawClient
    minimum: int  # its min_free_bytes


@contextmanager
def daemon_with_room(
    directory: Path, room: int | None, prepare: Callable[[Path], None] | None = None
) -> Iterator[Tight]:
    """A daemon on a library of its own, its min_free_bytes the free bytes now less `room`
    (negative: more than is free), or 0 when `room` is None. `prepare` is given download_path
    before the free bytes are measured, to put files there."""
    root = directory / "library"
    config = write_config(directory, root, libtorrent=NO_QUEUE)  # makes the folders
    if prepare is not None:
        prepare(root / "downloads")
    minimum = 0
    if room is not None:
        minimum = free_bytes(root / "downloads") - room
        assert minimum > 0, "this machine has too little free space for the test"
        config = write_config(directory, root, libtorrent=NO_QUEUE, min_free_bytes=minimum)
    library = Library(root, config)
    with running_daemon(config) as daemon, daemon.client() as client:
        yield Tight(library, daemon.socket, client, minimum)


def no_space(reply: dict[str, Any]) -> dict[str, Any]:
    """The error of a `no_space` reply, its figures checked for type."""
    assert code_of(reply) == "no_space", reply
    error = error_of(reply)
    assert isinstance(error["needed_bytes"], int), error
    assert isinstance(error["free_bytes"], int), error
    return error


def assert_near(measured: int, expected: int) -> None:
    assert abs(measured - expected) < TOLERANCE, (measured, expected)


def allocate(path: Path, size: int) -> None:
    """A file of `size` bytes whose blocks are all allocated, as a finished download's are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        os.posix_fallocate(file.fileno(), 0, size)


# --- the preflight ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_an_add_that_does_not_fit_is_refused_with_both_figures_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    with daemon_with_room(tmp_path, SIZE // 2) as tight:
        library, client = tight.library, tight.client
        state_before = library.state_file.read_bytes() if library.state_file.exists() else None
        torrent = fake_torrent(SIZE)
        error = no_space(torrent.add(client, task_id="big"))
        assert error["needed_bytes"] == SIZE
        assert_near(error["free_bytes"], free_bytes(library.downloads))
        assert client.call("list") == {"downloads": []}
        assert code_of(client.request("get", task_id="big")) == "not_found"
        assert not list(library.torrents.glob("*.torrent")) if library.torrents.exists() else True
        state_after = library.state_file.read_bytes() if library.state_file.exists() else None
        assert state_after == state_before


@pytest.mark.timeout(30)
def test_an_add_fits_in_the_free_bytes_less_min_free_bytes(tmp_path: Path) -> None:
    with daemon_with_room(tmp_path, 2 * SIZE) as tight:
        client = tight.client
        error = no_space(fake_torrent(3 * SIZE).add(client, task_id="too-big"))
        assert error["needed_bytes"] == 3 * SIZE
        result = client.call("add", torrent_b64=b64(fake_torrent(SIZE).data), task_id="fits")
        assert result["task_id"] == "fits"
        assert [info["task_id"] for info in client.call("list")["downloads"]] == ["fits"]


@pytest.mark.timeout(30)
def test_a_torrent_complete_on_disk_is_accepted_beyond_the_margin(tmp_path: Path) -> None:
    done, elsewhere = fake_torrent(ON_DISK), fake_torrent(ON_DISK)

    def put_files(downloads: Path) -> None:
        allocate(downloads / done.name, ON_DISK)  # downloaded before: complete on disk

    try:
        with daemon_with_room(tmp_path, ON_DISK // 2, put_files) as tight:
            client = tight.client
            assert no_space(elsewhere.add(client, task_id="elsewhere"))["needed_bytes"] == ON_DISK
            assert done.add(client, task_id="done", paused=True)["ok"] is True
    finally:
        (tmp_path / "library" / "downloads" / done.name).unlink(missing_ok=True)


@pytest.mark.timeout(30)
def test_only_the_files_an_add_wants_are_counted(tmp_path: Path) -> None:
    with daemon_with_room(tmp_path, SIZE // 2) as tight:
        client = tight.client
        torrent = fake_torrent({"big.bin": SIZE, "small.nfo": MiB})
        error = no_space(torrent.add(client, task_id="all", file_priorities=[1, 4]))
        assert error["needed_bytes"] == SIZE + MiB
        assert torrent.add(client, task_id="small", file_priorities=[0, 4])["ok"] is True


@pytest.mark.timeout(30)
def test_what_the_downloads_in_progress_still_need_is_counted_unless_paused(
    tmp_path: Path,
) -> None:
    with daemon_with_room(tmp_path, SIZE + SIZE // 2) as tight:
        client = tight.client
        assert fake_torrent(SIZE).add(client, task_id="first")["ok"] is True
        second = fake_torrent(SIZE)
        error = no_space(second.add(client, task_id="second"))
        assert error["needed_bytes"] == 2 * SIZE
        client.call("pause", task_id="first")
        assert second.add(client, task_id="second")["ok"] is True


@pytest.mark.timeout(30)
def test_a_retried_add_is_not_refused_for_space(tmp_path: Path) -> None:
    with daemon_with_room(tmp_path, SIZE + SIZE // 2) as tight:
        client = tight.client
        torrent = fake_torrent(SIZE)
        assert torrent.add(client, task_id="again")["ok"] is True
        # Another like it no longer fits, beside this one in progress...
        assert no_space(fake_torrent(SIZE).add(client, task_id="other"))["needed_bytes"] == 2 * SIZE
        # ...but the retry is the same download: it answers as the first did.
        retried = torrent.add(client, task_id="again")
        assert retried["ok"] is True, retried
        assert retried["result"]["info_hash"] == torrent.info_hash


@pytest.mark.timeout(30)
def test_two_adds_at_once_cannot_both_pass_on_the_same_free_bytes(tmp_path: Path) -> None:
    with daemon_with_room(tmp_path, SIZE + SIZE // 2) as tight:
        client = tight.client
        torrents = [fake_torrent(SIZE), fake_torrent(SIZE)]
        client.send_raw(
            b"".join(
                line({"id": n, "op": "add", "torrent_b64": b64(t.data), "task_id": f"race-{n}"})
                for n, t in enumerate(torrents)
            )
        )
        replies = sorted((client.read_reply() for _ in torrents), key=lambda r: not r["ok"])
        assert replies[0]["ok"] is True, replies
        assert no_space(replies[1])["needed_bytes"] == 2 * SIZE
        assert len(client.call("list")["downloads"]) == 1


# --- a daemon short of space --------------------------------------------------------------------


@pytest.fixture(scope="module", name="starved")
def fixture_starved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tight]:
    """A daemon whose min_free_bytes is more than the free bytes."""
    with daemon_with_room(tmp_path_factory.mktemp("starved"), -SIZE) as tight:
        yield tight


@pytest.mark.timeout(30)
def test_a_magnet_is_accepted_where_a_torrent_is_not(starved: Tight) -> None:
    client = starved.client
    assert code_of(fake_torrent(MiB).add(client, task_id="tiny")) == "no_space"
    magnet = f"magnet:?xt=urn:btih:{os.urandom(20).hex()}&dn=later"
    result = client.call("add", magnet=magnet, task_id="magnet")
    assert result["status"] in {"queued", "fetching_metadata"}


@pytest.mark.timeout(30)
def test_free_bytes_below_min_free_bytes_is_a_problem_in_ping_and_stats(starved: Tight) -> None:
    client = starved.client
    downloads = str(starved.library.downloads.resolve())
    stats = client.call("stats")
    for problems in (client.call("ping")["problems"], stats["problems"]):
        (problem,) = problems
        # One sentence naming the path, its free bytes (of the moment) and min_free_bytes.
        assert re.fullmatch(
            f"the file system of {re.escape(downloads)} has [0-9]+ bytes free, "
            f"less than min_free_bytes \\({starved.minimum}\\)",
            problem,
        ), problem
    assert_near(stats["free_bytes"], free_bytes(starved.library.downloads))


@pytest.mark.timeout(30)
def test_dlkeeper_stats_shows_the_problems(starved: Tight) -> None:
    downloads = str(starved.library.downloads.resolve())
    shown = subprocess.run(
        [sys.executable, "-m", "supervisor", "stats", "--socket", str(starved.socket)],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "COLUMNS": "400", "TERM": "dumb"},
        check=True,
    ).stdout.splitlines()
    assert re.fullmatch(r"free space +[0-9.]+ [KMGT]?i?B", shown[-2]), shown
    # The sentence says the free bytes of the moment: the test's and the command's may differ.
    sentence = f"the file system of {re.escape(downloads)} has [0-9]+ bytes free, less than"
    assert re.fullmatch(rf"problems +{sentence} min_free_bytes \([0-9]+\)", shown[-1]), shown


@pytest.mark.timeout(30)
def test_the_bytes_on_disk_are_not_counted_but_holes_are(starved: Tight) -> None:
    torrent = fake_torrent({"done.bin": 8 * MiB, "holes.bin": 2 * MiB, "missing.bin": MiB})
    folder = starved.library.downloads / torrent.name
    allocate(folder / "done.bin", 8 * MiB)  # downloaded before: complete on disk
    with (folder / "holes.bin").open("wb") as file:
        file.truncate(2 * MiB)  # its full size, but sparse: nothing of it is stored
    error = no_space(torrent.add(starved.client, task_id="partly-there"))
    assert error["needed_bytes"] == 3 * MiB


# --- a healthy daemon ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_ping_and_stats_report_no_problems_and_the_free_bytes(tmp_path: Path) -> None:
    with daemon_with_room(tmp_path, None) as tight:
        client = tight.client
        assert client.call("ping")["problems"] == []
        stats = client.call("stats")
        assert stats["problems"] == []
        assert isinstance(stats["free_bytes"], int)
        assert_near(stats["free_bytes"], free_bytes(tight.library.downloads))


@pytest.mark.timeout(30)
def test_free_bytes_is_null_when_the_download_path_is_gone(tmp_path: Path) -> None:
    with daemon_with_room(tmp_path, None) as tight:
        client = tight.client
        assert isinstance(client.call("stats")["free_bytes"], int)
        shutil.rmtree(tight.library.downloads)
        wait_until(lambda: not tight.library.downloads.exists(), "download_path to be gone")
        assert client.call("stats")["free_bytes"] is None
