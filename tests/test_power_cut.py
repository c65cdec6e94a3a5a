"""A power cut, for real (DESIGN.md, "Faults are tested"): the library and the downloads live on
an ext4 image mounted through a loop device; the daemon is downloading from a rate-limited
loopback seeder and has acknowledged some changes when, at a random moment, it and its worker
are SIGKILLed and the image file is copied without a sync. The copy holds what reached the
"disk"; the dirty pages of the mounted file system, which a power cut loses, are not in it.
The copy is then mounted where the original was (its journal replays) and judged:

- the state file loads, and every change acknowledged before the cut is in it;
- every piece a `.fastresume` claims hash-matches the bytes on the copy (none trusted corrupt);
- every `completed` download hash-matches;
- dlkeeper started on the copy finishes the interrupted downloads with every file right.

`scripts/power_cut.py` runs many cuts by hand and prints a summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from tests.api import NO_QUEUE, b64, seeding_now, wait_until
from tests.daemons import DEADLINE, Daemon, RawClient, write_config
from tests.mounts import loop_mounted as mounted
from tests.mounts import make_image, needs_root, unmount
from tests.swarm import Seeder
from tests.test_stop import children
from tests.torrents import Payload, make_payload

MiB = 1024 * 1024
PAYLOAD_FILES = {"feature.mkv": 20 * MiB, "extras/bonus.mkv": 8 * MiB, "extras/subs.srt": 300_000}
SEEDER_RATE = 10 * MiB  # bytes/s: the download takes about 3 s, so that cuts land in it
IMAGE_MIB = 160
# ext4 writes back dirty pages only when they are old (30 s) or memory runs short, and commits its
# journal every `commit` seconds: 60 keeps what dlkeeper did not fsync out of the copy.
MOUNT_OPTIONS = ("commit=60",)
TASK = "big"


@dataclass
class CutResult:
    """What one cut found on the copy."""

    moment: float  # seconds after the big add
    mid_download: bool  # the big download was not completed on the copy
    pieces_claimed: int = 0
    zero_claimed: int = 0  # of them, pieces whose bytes on the copy are all zeros (or missing)
    corrupt_trusted: list[str] = field(default_factory=list)  # "task: piece N" claimed, wrong
    acked_lost: list[str] = field(default_factory=list)
    completed_broken: list[str] = field(default_factory=list)
    not_finished_right: list[str] = field(default_factory=list)
    copy_retries: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.corrupt_trusted
            or self.acked_lost
            or self.completed_broken
            or self.not_finished_right
        )


def make_payloads(directory: Path) -> Payload:
    """The big download's payload: v1 only, so that a piece is plainly the files' bytes."""
    return make_payload(
        directory / "seed", "Release", PAYLOAD_FILES, flags=lt.create_torrent.v1_only
    )


# --- the copy: what reached the disk --------------------------------------------------------


def loop_device_of(mountpoint: Path) -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        device, where, *_ = line.split()
        if where == str(mountpoint):
            return Path(device).name
    raise AssertionError(f"{mountpoint} is not mounted")


def _writes_and_in_flight(device: str) -> tuple[int, int]:
    fields = Path(f"/sys/block/{device}/stat").read_text().split()
    return int(fields[4]), int(fields[8])


def copy_without_sync(image: Path, copy: Path, device: str) -> int:
    """Copies `image` as its loop device last wrote it: no sync, and again if the device wrote
    while it was being copied (a real disk loses power at one instant). Returns the retries."""
    for attempt in range(20):
        wait_until(lambda: _writes_and_in_flight(device)[1] == 0, "the loop device to be idle")
        before = _writes_and_in_flight(device)[0]
        shutil.copyfile(image, copy)
        if _writes_and_in_flight(device) == (before, 0):
            return attempt
    raise AssertionError(f"{device} kept writing while its image was copied")


def kill_all(daemon: Daemon) -> None:
    """SIGKILL of the daemon and its worker at once: nothing of either runs after the cut."""
    pids = [daemon.process.pid, *children(daemon.process.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    daemon.process.wait(DEADLINE)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids[1:]), "the worker")


# --- judging the copy -------------------------------------------------------------------------


def piece_bytes(info: Any, save_path: Path, piece: int) -> bytes:
    """The bytes of `piece` as the files on disk hold them (a missing file reads as nothing)."""
    files = info.layout()
    data = bytearray()
    for part in info.map_block(piece, 0, info.piece_size(piece)):
        path = save_path / files.file_path(part.file_index)
        try:
            with path.open("rb") as file:
                file.seek(part.offset)
                data += file.read(part.size)
        except FileNotFoundError:
            pass
    return bytes(data)


def judge_resume_data(resume: Path) -> tuple[int, int, list[str]]:
    """The pieces a .fastresume claims, how many of them read as zeros on disk, and those
    whose bytes on disk are wrong."""
    params = lt.read_resume_data(resume.read_bytes())
    info = params.ti
    if info is None:  # no metadata yet: nothing claimed
        return 0, 0, []
    claimed, zeros, corrupt = 0, 0, []
    save_path = Path(params.save_path)
    for piece, have in enumerate(params.have_pieces):
        if not have or piece >= info.num_pieces():
            continue
        claimed += 1
        data = piece_bytes(info, save_path, piece)
        zeros += not data.strip(b"\0")
        digest = hashlib.sha1(data).digest()  # v1 piece hash
        if digest != info.hash_for_piece(piece):
            corrupt.append(f"{resume.stem}: piece {piece}")
    return claimed, zeros, corrupt


def files_right(save_path: Path, payload: Payload) -> bool:
    for relative, expected in payload.file_hashes.items():
        path = save_path / relative
        if not path.is_file():
            return False
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(4 * MiB):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            return False
    return True


# --- one cut ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where one cut happens: the image, its copy, the mountpoint, the daemon's config folder."""

    work: Path

    @property
    def image(self) -> Path:
        return self.work / "disk.img"

    @property
    def copy(self) -> Path:
        return self.work / "after-the-cut.img"

    @property
    def mountpoint(self) -> Path:
        return self.work / "mnt"

    @property
    def library(self) -> Path:
        return self.mountpoint / "library"

    @property
    def downloads(self) -> Path:
        return self.library / "downloads"


def config_for(site: Site, name: str) -> Path:
    return write_config(
        site.work / name,
        site.library,
        libtorrent=NO_QUEUE,
        resume_save_interval=1,
        shutdown_timeout=5,
    )


def magnet(number: int) -> str:
    """A magnet no peer has: it stays fetching metadata (its add is the acknowledged change)."""
    digest = hashlib.sha1(f"power-cut-{number}".encode()).hexdigest()  # a name, not a secret
    return f"magnet:?xt=urn:btih:{digest}&dn=waiting-{number}"


def act_until_the_cut(
    client: RawClient, payload: Payload, seeder: Seeder, moment: float, chooser: random.Random
) -> tuple[dict[str, str | None], float]:
    """Adds the big download and does acknowledged changes until `moment` seconds after it.
    Returns the acknowledged downloads (task_id -> status they must have, None: any) and when
    the big one was added (time.monotonic())."""
    acked: dict[str, str | None] = {}
    started = time.monotonic()
    client.call("add", torrent_b64=b64(payload.torrent), task_id=TASK, peers=[seeder.peer])
    acked[TASK] = None
    client.call("add", magnet=magnet(0), task_id="other")
    acked["other"] = None
    client.call("pause", task_id="other")
    acked["other"] = "paused"
    number = 1
    while True:
        pause = chooser.uniform(0.05, 0.6)
        left = moment - (time.monotonic() - started)
        if left <= pause:
            time.sleep(max(left, 0))  # the cut comes at a random moment, not on an event
            return acked, started
        time.sleep(pause)
        task_id = f"added-{number}"
        client.call("add", magnet=magnet(number), task_id=task_id, paused=chooser.random() < 0.5)
        acked[task_id] = None
        number += 1


def cut_moments() -> tuple[float, float]:
    """The span of a cut's moment, in seconds after the add: the download, and after it."""
    return 0.2, sum(PAYLOAD_FILES.values()) / SEEDER_RATE * 1.5


def one_cut(
    site: Site,
    payload: Payload,
    seeder: Seeder,
    chooser: random.Random,
    moment: float | None = None,
) -> CutResult:
    """One power cut at `moment` (random if None) of the download, and the judgement of the
    copy."""
    site.work.mkdir(parents=True, exist_ok=True)
    make_image(site.image, "ext4", IMAGE_MIB)
    if moment is None:
        moment = chooser.uniform(*cut_moments())
    with mounted(site.image, site.mountpoint, "ext4", *MOUNT_OPTIONS):
        config = config_for(site, "before")
        daemon = Daemon(config)
        try:
            daemon.wait_ready()
            with daemon.client() as client:
                acked, _ = act_until_the_cut(client, payload, seeder, moment, chooser)
            kill_all(daemon)
        finally:
            daemon.close()
        retries = copy_without_sync(site.image, site.copy, loop_device_of(site.mountpoint))
    site.image.unlink()
    try:
        with mounted(site.copy, site.mountpoint, "ext4"):
            result = judge(site, payload, seeder, acked, moment)
            result.copy_retries = retries
            return result
    finally:
        site.copy.unlink(missing_ok=True)


def judge(
    site: Site, payload: Payload, seeder: Seeder, acked: dict[str, str | None], moment: float
) -> CutResult:
    state_file = site.library / "data" / "downloads.json"
    downloads: dict[str, Any] = json.loads(state_file.read_bytes())["downloads"]
    big = downloads.get(TASK, {})
    result = CutResult(moment=moment, mid_download=big.get("status") != "completed")
    for task_id, status in acked.items():
        if task_id not in downloads or status not in (None, downloads[task_id]["status"]):
            result.acked_lost.append(task_id)
    for resume in sorted((site.downloads / "torrents").glob("*.fastresume")):
        claimed, zeros, corrupt = judge_resume_data(resume)
        result.pieces_claimed += claimed
        result.zero_claimed += zeros
        result.corrupt_trusted += corrupt
    for task_id, record in downloads.items():
        if record["status"] == "completed" and not files_right(Path(record["save_path"]), payload):
            result.completed_broken.append(task_id)
    # dlkeeper on the copy: it loads the state and finishes what the cut interrupted.
    daemon = Daemon(config_for(site, "after"))
    try:
        daemon.wait_ready()
        with daemon.client() as client:

            def big_done() -> bool:
                return bool(client.call("get", task_id=TASK)["status"] == "completed")

            try:
                wait_until(big_done, "the big download to finish after the cut", timeout=60)
            except AssertionError:
                result.not_finished_right.append(f"{TASK}: not completed")
            listed = {info["task_id"] for info in client.call("list")["downloads"]}
            result.acked_lost += [task_id for task_id in acked if task_id not in listed]
        assert daemon.stop() == 0
    finally:
        daemon.close()
    if not files_right(site.downloads, payload):
        result.not_finished_right.append(f"{TASK}: files wrong")
    return result


@contextlib.contextmanager
def power_cut_swarm(directory: Path) -> Iterator[tuple[Payload, Seeder]]:
    payload = make_payloads(directory)
    with seeding_now(payload, upload_rate_limit=SEEDER_RATE) as seeder:
        yield payload, seeder


def cleanup(site: Site) -> None:
    unmount(site.mountpoint)
    shutil.rmtree(site.work, ignore_errors=True)


# --- the test ---------------------------------------------------------------------------------

CUTS = 4


@needs_root
@pytest.mark.timeout(150)
def test_a_power_cut_at_random_moments_loses_no_acknowledged_change_and_trusts_no_lost_piece(
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 32)
    chooser = random.Random(seed)
    results: list[CutResult] = []
    with power_cut_swarm(tmp_path) as (payload, seeder):
        first, last = cut_moments()
        slot = (last - first) / CUTS
        for number in range(CUTS):
            # One random moment in each of CUTS slots: early, mid-download, late, after.
            moment = first + slot * (number + chooser.random())
            site = Site(tmp_path / f"cut-{number}")
            try:
                results.append(one_cut(site, payload, seeder, chooser, moment))
            finally:
                cleanup(site)
    failed = [result for result in results if not result.ok]
    assert not failed, f"seed {seed}: {failed}"
    assert sum(result.pieces_claimed for result in results) > 0, "no cut found a claim to judge"
