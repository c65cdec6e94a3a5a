"""The session actor: owns the libtorrent worker process, restarts it, and replays into it.

The worker (`actors.session_worker`) is a child process, so that nothing libtorrent does can take
the daemon down. This actor spawns it, waits for its `ready` under a deadline, replays every
active download the persistence actor holds, and then watches it: a worker that exits or stops
answering its heartbeat is killed and replaced (with backoff), and everything is replayed into
the new one. More than `max_restarts` restarts within `restart_window` seconds and the actor
fails, which stops the daemon with a non-zero status so that systemd can take over (OTP's rule).

It writes the `.torrent` copy of a magnet once its metadata arrives and every `.fastresume`
file (each by atomic replace), and publishes what the rest of the daemon must know: metadata
kept, finished, errored (libtorrent errors and replay failures), worker restarted.

libtorrent never fsyncs, so before a `.fastresume` is kept, and before a finish is published
(the monitor then records `completed`), the download's files are fsynced here: a power cut must
not leave resume data claiming pieces the disk never got, nor a completed download with holes.
A write or fsync that fails is kept (the newest resume data per download) and retried with
backoff, reported in `problems` meanwhile: libtorrent hands its resume data out only once.

A download whose disk is full is not errored: it waits for space (`actors.diskspace`), with the
other downloads on that file system, and goes on by itself once there is space again.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors import diskspace
from actors.atomic import fsync_files, read_small_file, write_file_atomically
from actors.diskspace import SpaceWaits
from actors.errors import (
    DlkeeperError,
    InvalidTorrent,
    NotFound,
    NotReady,
    RestartIntensityExceeded,
    StorageMissing,
    WorkerGone,
    WorkerTimeout,
)
from actors.layout import MAX_RESUME_BYTES, Layout, replay_torrent
from actors.mailbox import Actor, ActorRef, Envelope, Reply, expect
from actors.messages.base import DoneReply, Message
from actors.messages.session import (
    AddDownload,
    AwaitReplayed,
    DownloadErrored,
    DownloadFinished,
    DownloadMetadataKept,
    DownloadProgressKept,
    DownloadStateChanged,
    GetDownloadStatus,
    GetSessionStats,
    PauseDownload,
    RemoveDownload,
    ResumeDownload,
    RetryDownload,
    SaveAllResumeData,
    SessionCommand,
    SessionEvent,
    SessionStatsReply,
    SetDownloadFiles,
    WorkerRestarted,
)
from actors.messages.worker import (
    AddTorrent,
    FilePrioritiesReply,
    GetTorrentStatus,
    MetadataReceived,
    PauseTorrent,
    Ping,
    PongReply,
    RemoveTorrent,
    ResumeDataSaved,
    ResumeSavedReply,
    ResumeTorrent,
    SaveResumeData,
    SetTorrentFiles,
    SpaceBack,
    StatusReply,
    TorrentAddedReply,
    TorrentFailed,
    TorrentFinished,
    TorrentOutOfSpace,
    TorrentStateChanged,
    TorrentStatus,
    WaitForSpace,
)
from actors.metainfo import torrent_name
from actors.persistence import Persistence
from actors.problems import Problems
from actors.state import ACTIVE_STATUSES, DownloadRecord, DownloadStatus
from actors.worker_process import WORKER_COMMAND, WorkerProcess, spawn_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    """How the session actor runs its worker. The defaults are documented in the README."""

    layout: Layout
    libtorrent: Mapping[str, str | int | bool] = field(default_factory=dict)
    resume_save_interval: float = 60.0
    shutdown_timeout: float = 5.0
    min_free_bytes: int = 0  # kept free on a download's file system (a full one waits for it)
    heartbeat_interval: float = 1.0  # seconds between pings of the worker
    heartbeat_timeout: float = 3.0  # a ping unanswered this long means the worker hangs
    start_timeout: float = 30.0  # for the worker's `ready`
    request_timeout: float = 30.0  # for one command to the worker, and for a restart to finish
    max_restarts: int = 5  # more restarts than this within restart_window: give up
    restart_window: float = 60.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    worker_stop_timeout: float = 2.0  # after stdin closes, and again after SIGTERM
    write_retry_initial: float = 0.5  # first wait before a failed resume write or fsync is retried
    write_retry_max: float = 30.0
    worker_command: tuple[str, ...] = WORKER_COMMAND


# --- the actor ------------------------------------------------------------------------------------


class SessionActor(Actor[SessionCommand]):
    """Owns the worker; see the module docstring."""

    name = "session"

    def __init__(
        self,
        options: SessionOptions,
        persistence: Persistence,
        publish: MemoryObjectSendStream[SessionEvent],
        problems: Problems | None = None,
    ) -> None:
        self._options = options
        self._problems = problems or Problems()
        self._persistence = persistence
        self._publish = publish
        self._worker: WorkerProcess | None = None
        self._worker_ready = False
        self._worker_changed = anyio.Event()
        self._replayed = anyio.Event()
        self._forgotten: set[str] = set()  # stopped: late files from the worker are dropped
        self._unsynced: set[str] = set()  # changes saved that met no ready worker
        self._restarts = 0
        self._stopping = False
        self._last_heartbeat = 0.0
        self._last_failure = ""
        self._resumed_at_start = 0
        self._resume_failures = 0
        self._storage_at_start: tuple[int, int] | None = None  # file systems of the folders
        self._space = SpaceWaits(options.min_free_bytes)
        self._space_lock = anyio.Lock()  # one look at the free space at a time
        self._space_wanted = anyio.Event()  # set: look at the free space now
        # Failed to keep, so kept here to retry (libtorrent hands each out once): the newest
        # resume data of each download, and finishes whose files could not be made durable.
        self._unwritten_resume: dict[str, ResumeDataSaved] = {}
        self._unrecorded_finish: dict[str, TorrentFinished] = {}
        self._write_failed = anyio.Event()
        events_send, events_receive = anyio.create_memory_object_stream[
            Message | _Flush | _RetryWrites
        ](math.inf)
        self._worker_events_send = events_send
        self._worker_events = events_receive

    async def on_start(self) -> None:
        with contextlib.suppress(OSError):  # missing: the daemon does not start (supervisor.app)
            self._storage_at_start = await anyio.to_thread.run_sync(
                self._options.layout.storage_devices
            )
        # A crash mid-write leaves `.<task_id>.fastresume.<random>.tmp` behind: nobody's now.
        leftovers = await anyio.to_thread.run_sync(self._options.layout.leftover_temporaries)
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                await anyio.to_thread.run_sync(path.unlink)
        if leftovers:
            names = ", ".join(path.name for path in leftovers)
            log.info("removed temporary files a crash left in %s: %s", leftovers[0].parent, names)

    async def run(self, inbox: MemoryObjectReceiveStream[Envelope[SessionCommand]]) -> None:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._keep_worker_running)
            task_group.start_soon(self._handle_worker_events)
            task_group.start_soon(self._save_resume_data_periodically)
            task_group.start_soon(self._retry_failed_writes)
            task_group.start_soon(self._watch_space)
            async for envelope in inbox:
                task_group.start_soon(self._serve, envelope.message, envelope.asked())
                del envelope  # not kept until the next command: an add's holds its .torrent
            await self._shut_down()
            task_group.cancel_scope.cancel()

    # --- the worker's life ----------------------------------------------------------------------

    async def _keep_worker_running(self) -> None:
        restarts: deque[float] = deque()
        failed_starts = 0  # in a row, without a worker that got as far as serving
        backoff = self._options.backoff_initial
        while True:
            started = time.monotonic()
            reason, served = await self._run_one_worker()
            if self._stopping:
                return
            failed_starts = 0 if served else failed_starts + 1
            if time.monotonic() - started > self._options.restart_window:
                backoff = self._options.backoff_initial  # it was stable: start over
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > self._options.restart_window:
                restarts.popleft()
            # A worker that never gets ready may take longer than the window to fail, so
            # failed starts in a row count on their own.
            if max(len(restarts), failed_starts) > self._options.max_restarts:
                raise RestartIntensityExceeded(
                    f"the libtorrent worker failed {max(len(restarts), failed_starts)} times "
                    f"within {self._options.restart_window:g} s or in a row (last: {reason}); "
                    "giving up"
                )
            self._restarts += 1
            self._last_failure = reason
            log.warning(
                "libtorrent worker %s; restart %d in %.1f s", reason, self._restarts, backoff
            )
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self._options.backoff_max)

    async def _run_one_worker(self) -> tuple[str, bool]:
        """Runs one worker from spawn to death; returns why it ended and whether it served."""
        # Closing: the worker is writing what it holds; killing it at once would lose it.
        grace = lambda: self._stop_grace() if self._stopping else 0.0  # noqa: E731
        spawned = spawn_worker(
            self._options.worker_command, self._worker_events_send, exit_grace=grace
        )
        async with spawned as worker:
            try:
                return await self._serve_worker(worker)
            finally:
                self._worker = None
                self._set_worker_ready(False)

    def _stop_grace(self) -> float:
        return self._options.shutdown_timeout + 2 * self._options.worker_stop_timeout + 1

    async def _serve_worker(self, worker: WorkerProcess) -> tuple[str, bool]:
        try:
            ready = await worker.configure(self._options.libtorrent, self._options.start_timeout)
        except WorkerGone as exc:
            return str(exc), False
        log.info(
            "libtorrent %s worker (pid %d) listening on port %d",
            ready.libtorrent_version,
            worker.pid,
            ready.listen_port,
        )
        self._worker = worker
        if self._restarts:
            # Through the worker's event queue, so that it follows every event of the old worker
            # and precedes every event of the new one.
            self._worker_events_send.send_nowait(
                WorkerRestarted(restarts=self._restarts, reason=self._last_failure)
            )
        if not await self._replay(worker) or not await self._resync(worker):
            return f"died during the replay ({worker.exit_reason})", False
        self._last_heartbeat = time.monotonic()  # it has just answered every replayed add
        self._set_worker_ready(True)
        return await self._watch(worker), True

    def _set_worker_ready(self, ready: bool) -> None:
        self._worker_ready = ready
        changed, self._worker_changed = self._worker_changed, anyio.Event()
        changed.set()

    async def _watch(self, worker: WorkerProcess) -> str:
        """Returns when the worker has exited or stopped answering its heartbeat."""
        while True:
            with anyio.move_on_after(self._options.heartbeat_interval):
                await worker.exited.wait()
                return f"exited ({worker.exit_reason})"
            if self._stopping:  # no more pings: _shut_down is closing it
                await worker.exited.wait()
                return "stopped"
            try:
                await worker.request(
                    lambda request_id: Ping(id=request_id),
                    self._options.heartbeat_timeout,
                    PongReply,
                )
                self._last_heartbeat = time.monotonic()
            except WorkerTimeout as exc:
                return f"hung ({exc})"
            except WorkerGone:
                return f"exited ({worker.exit_reason})"

    async def _replay(self, worker: WorkerProcess) -> bool:
        """Adds every active download; False when the worker died (or hung) meanwhile."""
        first = not self._replayed.is_set()
        snapshot = await self._persistence.snapshot()
        active = [record for record in snapshot.values() if record.status in ACTIVE_STATUSES]
        sources = await anyio.to_thread.run_sync(self._read_sources, active)
        failures = 0
        started = time.monotonic()

        async def replay_one(record: DownloadRecord) -> None:
            nonlocal failures
            try:
                await self._add(worker, record, sources[record.task_id])
            except WorkerGone:
                raise
            except DlkeeperError as exc:
                failures += 1
                reason = f"cannot be resumed: {exc}"
                log.error("download %s %s", record.task_id, reason)
                await self._publish.send(DownloadErrored(task_id=record.task_id, error=reason))

        worker_died = False
        try:
            async with anyio.create_task_group() as task_group:
                for record in active:
                    task_group.start_soon(replay_one, record)
        except* WorkerGone:
            worker_died = True
        if worker_died:
            return False
        log.info(
            "replayed %d of %d downloads in %.3f s",
            len(active) - failures,
            len(active),
            time.monotonic() - started,
        )
        if first:
            self._resumed_at_start = len(active) - failures
            self._resume_failures += failures
            self._replayed.set()
        return True

    async def _resync(self, worker: WorkerProcess) -> bool:
        """Brings the downloads whose changes met no ready worker (`NotReady`) to their saved
        state in `worker`, before it serves: a change saved after the replay's snapshot is
        applied too. False when the worker died meanwhile (they stay to be synced)."""
        while self._unsynced:
            task_id = self._unsynced.pop()
            try:
                await self._sync(worker, task_id)
            except WorkerGone:
                self._unsynced.add(task_id)
                return False
            except DlkeeperError as exc:
                log.error("download %s: cannot apply its saved state: %s", task_id, exc)
        return True

    async def _sync(self, worker: WorkerProcess, task_id: str) -> None:
        try:
            record: DownloadRecord | None = await self._persistence.get(task_id)
        except NotFound:
            record = None
        commands: list[SessionCommand] = []
        if record is None:  # cancelled or acked: out of libtorrent, files included
            commands.append(RemoveDownload(task_id=task_id))
        elif record.status in ACTIVE_STATUSES:
            # An add changes nothing of one present already: its pause state and priorities
            # as saved, too.
            paused = record.status is DownloadStatus.PAUSED
            commands.append(AddDownload(record=record))
            commands.append(
                PauseDownload(task_id=task_id) if paused else ResumeDownload(task_id=task_id)
            )
            if record.file_priorities:
                commands.append(
                    SetDownloadFiles(task_id=task_id, file_priorities=record.file_priorities)
                )
        for command in commands:
            await self._execute_on(worker, command)

    def _read_sources(self, records: list[DownloadRecord]) -> dict[str, _Sources]:
        return {record.task_id: self._read_source(record) for record in records}

    def _read_source(self, record: DownloadRecord) -> _Sources:
        """What a download can be added from: its .torrent (see `actors.layout.replay_torrent`)
        and its fast-resume data."""
        torrent = replay_torrent(record, self._options.layout)
        resume: bytes | None = None
        resume_path = self._options.layout.resume_path(record.task_id)
        try:
            resume = read_small_file(resume_path, MAX_RESUME_BYTES)
        except FileNotFoundError:
            pass
        except (OSError, DlkeeperError) as exc:
            log.warning("download %s: %s ignored: %s", record.task_id, resume_path, _reason(exc))
        return _Sources(_b64(torrent.data), _b64(resume), torrent.problem)

    async def _add(self, worker: WorkerProcess, record: DownloadRecord, sources: _Sources) -> None:
        if sources.torrent_b64 is None and not record.magnet_link:
            raise InvalidTorrent(sources.problem or "it has neither a .torrent nor a magnet link")
        if sources.problem:
            log.warning("download %s: %s; using its magnet link", record.task_id, sources.problem)
        peers = await resolve_peers(record.peers)
        self._forgotten.discard(record.task_id)
        full_disk = await self._full_disk_reason(record.save_path)

        def add_from(torrent_b64: str | None) -> Callable[[int], AddTorrent]:
            return lambda request_id: AddTorrent(
                id=request_id,
                task_id=record.task_id,
                torrent_b64=torrent_b64,
                magnet=record.magnet_link if torrent_b64 is None else None,
                resume_b64=sources.resume_b64,
                save_path=record.save_path,
                file_priorities=record.file_priorities,
                paused=record.status is DownloadStatus.PAUSED,
                peers=peers,
                wait_for_space=full_disk,
            )

        try:
            await worker.request(
                add_from(sources.torrent_b64), self._options.request_timeout, TorrentAddedReply
            )
        except InvalidTorrent:
            if sources.torrent_b64 is None or not record.magnet_link:
                raise
            log.warning("download %s: its .torrent is invalid; using its magnet", record.task_id)
            await worker.request(add_from(None), self._options.request_timeout, TorrentAddedReply)

    # --- events from the worker -----------------------------------------------------------------

    async def _handle_worker_events(self) -> None:
        async for event in self._worker_events:
            if isinstance(event, _Flush):
                event.done.set()
                continue
            if isinstance(event, _RetryWrites):
                await self._retry_writes_now()
                event.done.set()
                continue
            try:
                await self._on_worker_event(event)
            except (OSError, DlkeeperError, ValueError) as exc:
                log.error("cannot keep what the worker sent (%s): %s", type(event).__name__, exc)

    async def _on_worker_event(self, event: Message) -> None:
        if isinstance(event, ResumeDataSaved):
            self._unwritten_resume.pop(event.task_id, None)  # this one is newer
            await self._keep_resume_data(event)
        elif isinstance(event, MetadataReceived):
            if event.task_id in self._forgotten:
                return
            await self._wait_unless_it_fits(event.task_id)
            path = self._options.layout.torrent_path(event.task_id)
            data = _unb64(event.torrent_b64)
            await anyio.to_thread.run_sync(write_file_atomically, path, data)
            await self._publish.send(
                DownloadMetadataKept(
                    task_id=event.task_id, torrent_path=str(path), name=torrent_name(data)
                )
            )
        elif isinstance(event, TorrentFinished):
            await self._record_finish(event)
        elif isinstance(event, TorrentFailed):
            gone = await anyio.to_thread.run_sync(self._storage_gone)
            if gone is not None:
                # A file error of a drive that went away: not the download's failure. The
                # daemon stops on it (supervisor.app), and the replay after it goes on.
                log.error("download %s: %s; not failed, as %s", event.task_id, event.error, gone)
                return
            await self._publish.send(DownloadErrored(task_id=event.task_id, error=event.error))
        elif isinstance(event, TorrentOutOfSpace):
            download_path = self._options.layout.download_path
            try:
                place = await anyio.to_thread.run_sync(
                    diskspace.place_of, event.save_path, download_path
                )
            except OSError:  # the worker holds it all the same: the next look adopts it
                place = None
            log.warning("download %s waits for disk space: %s", event.task_id, event.error)
            if place is not None:
                self._space.ran_out(place)
            self._space_wanted.set()
        elif isinstance(event, WorkerRestarted):
            await self._publish.send(event)
        elif isinstance(event, TorrentStateChanged):
            await self._publish.send(
                DownloadStateChanged(
                    task_id=event.task_id, state=event.state, previous=event.previous
                )
            )

    async def _keep_resume_data(self, event: ResumeDataSaved) -> None:
        """Writes the `.fastresume`, once the bytes it claims are durable; on failure keeps it
        to retry (see `_retry_failed_writes`)."""
        task_id = event.task_id
        if task_id in self._forgotten:  # not for a download stopped meanwhile
            return
        path = self._options.layout.resume_path(task_id)
        data = _unb64(event.resume_b64)
        try:
            await anyio.to_thread.run_sync(self._fsync_payload, event.payload_files)
        except OSError as exc:
            self._write_failed_for(
                event,
                f"the resume data of download {task_id} is not kept, as its files cannot be "
                f"made durable ({_reason(exc)}); retrying",
            )
            return
        try:
            await anyio.to_thread.run_sync(write_file_atomically, path, data)
        except OSError as exc:
            self._write_failed_for(event, f"cannot write {path} ({_reason(exc)}); retrying")
            return
        self._problems.clear(_resume_problem(task_id))
        await self._publish.send(DownloadProgressKept(task_id=task_id, progress=event.progress))

    async def _record_finish(self, event: TorrentFinished) -> None:
        """Publishes the finish (the monitor records `completed`), once every file is durable;
        on failure keeps it to retry (see `_retry_failed_writes`)."""
        task_id = event.task_id
        if task_id in self._forgotten:
            self._unrecorded_finish.pop(task_id, None)
            return
        try:
            await anyio.to_thread.run_sync(self._fsync_payload, event.payload_files)
        except OSError as exc:
            self._write_failed_for(
                event,
                f"download {task_id} finished but its files cannot be made durable "
                f"({_reason(exc)}); its completion waits, retrying",
            )
            return
        self._unrecorded_finish.pop(task_id, None)
        self._problems.clear(_finish_problem(task_id))
        await self._publish.send(DownloadFinished(task_id=task_id))

    def _fsync_payload(self, paths: tuple[str, ...]) -> None:
        # Up to download_path: a save_path, and its folders, may be new.
        fsync_files(paths, root=str(self._options.layout.download_path))

    def _write_failed_for(self, event: ResumeDataSaved | TorrentFinished, problem: str) -> None:
        if isinstance(event, ResumeDataSaved):
            self._unwritten_resume[event.task_id] = event
            self._problems.report(_resume_problem(event.task_id), problem)
        else:
            self._unrecorded_finish[event.task_id] = event
            self._problems.report(_finish_problem(event.task_id), problem)
        self._write_failed.set()

    def _has_failed_writes(self) -> bool:
        return bool(self._unwritten_resume or self._unrecorded_finish)

    def _drop_failed_writes(self, task_id: str) -> None:
        """A download forgotten: what it failed to write is no longer to be written."""
        self._unwritten_resume.pop(task_id, None)
        self._unrecorded_finish.pop(task_id, None)
        self._problems.clear(_resume_problem(task_id))
        self._problems.clear(_finish_problem(task_id))

    async def _retry_failed_writes(self) -> None:
        """Retries the failed resume writes and finishes, with backoff, while there are any."""
        delay = self._options.write_retry_initial
        while True:
            if not self._has_failed_writes():
                delay = self._options.write_retry_initial
                self._write_failed = anyio.Event()
                await self._write_failed.wait()
            await anyio.sleep(delay)
            await self._retry_writes_in_order()
            delay = min(delay * 2, self._options.write_retry_max)

    async def _retry_writes_in_order(self) -> None:
        """Retries the failed writes through the worker's event queue: in order with newer
        resume data, which is handled there too, so an older one never replaces it."""
        retry = _RetryWrites()
        self._worker_events_send.send_nowait(retry)
        await retry.done.wait()

    async def _retry_writes_now(self) -> None:
        for event in list(self._unwritten_resume.values()):
            del self._unwritten_resume[event.task_id]
            await self._keep_resume_data(event)
        for finish in list(self._unrecorded_finish.values()):
            await self._record_finish(finish)

    # --- waiting for disk space ---------------------------------------------------------------

    async def _watch_space(self) -> None:
        """While downloads wait for space: a look at it every POLL_INTERVAL, and at once when
        asked (`_space_wanted`)."""
        while True:
            if not self._space:
                await self._space_wanted.wait()
            self._space_wanted = anyio.Event()
            worker = self._worker
            if worker is not None and self._worker_ready:
                try:
                    await self._look_at_space(worker)
                except DlkeeperError as exc:
                    log.warning("cannot look at the disk space downloads wait for: %s", exc)
            with anyio.move_on_after(diskspace.POLL_INTERVAL):
                await self._space_wanted.wait()

    async def _look_at_space(self, worker: WorkerProcess) -> None:
        """Holds what must wait for space (every download writing to a full file system),
        lets go what may go on, and says so in `problems`."""
        async with self._space_lock:
            timeout = self._options.request_timeout
            reply = await worker.request(
                lambda request_id: GetTorrentStatus(id=request_id), timeout, StatusReply
            )
            paths = self._space.paths()

            def measure() -> tuple[dict[str, int | None], dict[int, int | None]]:
                devices = diskspace.devices_of(torrent.save_path for torrent in reply.torrents)
                free = {device: diskspace.free_bytes(path) for device, path in paths.items()}
                return devices, free

            devices, free = await anyio.to_thread.run_sync(measure)
            plan = self._space.plan(reply.torrents, devices, free)
            for reason, task_ids in plan.holds.items():
                await worker.request(
                    _wait_for_space(task_ids, reason),
                    timeout,
                    DoneReply,
                )
            if plan.releases:
                log.info("disk space is back for %s", ", ".join(plan.releases))
                await worker.request(
                    lambda request_id: SpaceBack(id=request_id, task_ids=plan.releases),
                    timeout,
                    DoneReply,
                )
            for key, sentence in plan.problems.items():
                if sentence is None:
                    self._problems.clear(key)
                else:
                    self._problems.report(key, sentence)

    async def _full_disk_reason(self, save_path: str) -> str | None:
        """Why a download saved at `save_path` must wait, when its file system is full."""
        if not self._space:
            return None
        download_path = self._options.layout.download_path
        try:
            place = await anyio.to_thread.run_sync(diskspace.place_of, save_path, download_path)
        except OSError:
            return None
        if not self._space.is_full(place.device):
            return None
        free = await anyio.to_thread.run_sync(diskspace.free_bytes, save_path)
        return self._space.full_reason(place.device, free)

    async def _wait_unless_it_fits(self, task_id: str) -> None:
        """A magnet's metadata arrived, and the worker holds it until told: it waits when its
        wanted bytes do not fit in the free space less min_free_bytes (the add preflight could
        not know them) or its disk is full, else it goes on."""
        worker = self._worker
        if worker is None:
            return  # the replay adds it again, from its .torrent then
        try:
            reason = await self._why_it_does_not_fit(worker, task_id)
        except (DlkeeperError, OSError) as exc:
            log.warning("download %s: cannot tell whether it fits: %s", task_id, _reason(exc))
            reason = None
        timeout = self._options.request_timeout
        with contextlib.suppress(DlkeeperError):  # removed meanwhile, or the worker is gone
            if reason is None:
                await worker.request(
                    lambda request_id: SpaceBack(id=request_id, task_ids=(task_id,)),
                    timeout,
                    DoneReply,
                )
            else:
                log.warning("download %s: %s", task_id, reason)
                await worker.request(_wait_for_space((task_id,), reason), timeout, DoneReply)
                self._space_wanted.set()

    async def _why_it_does_not_fit(self, worker: WorkerProcess, task_id: str) -> str | None:
        reply = await worker.request(
            lambda request_id: GetTorrentStatus(id=request_id, task_id=task_id),
            self._options.request_timeout,
            StatusReply,
        )
        (status,) = reply.torrents
        wanted = status.total_bytes - status.downloaded_bytes
        if status.finished or wanted <= 0:
            return None
        download_path = self._options.layout.download_path

        def measure() -> tuple[diskspace.Place, int | None]:
            place = diskspace.place_of(status.save_path, download_path)
            return place, diskspace.free_bytes(status.save_path)

        place, free = await anyio.to_thread.run_sync(measure)
        if self._space.is_full(place.device):
            return self._space.full_reason(place.device, free)
        if self._space.fits(free, wanted):
            return None
        self._space.does_not_fit(place, task_id, wanted)
        return self._space.need_reason(place.device, free, wanted)

    def _storage_gone(self) -> StorageMissing | None:
        if self._storage_at_start is None:
            return None
        return self._options.layout.storage_gone(self._storage_at_start)

    async def _flush_worker_events(self) -> None:
        """Returns once every event read from the worker so far has been handled."""
        flush = _Flush()
        self._worker_events_send.send_nowait(flush)
        await flush.done.wait()

    async def _save_resume_data_periodically(self) -> None:
        while True:
            await anyio.sleep(self._options.resume_save_interval)
            worker = self._worker
            if worker is None or not self._worker_ready:
                continue
            try:
                await worker.request(
                    lambda request_id: SaveResumeData(id=request_id, only_if_modified=True),
                    self._options.request_timeout,
                    ResumeSavedReply,
                )
            except DlkeeperError as exc:
                log.warning("periodic save of resume data failed: %s", exc)

    # --- commands -------------------------------------------------------------------------------

    async def _serve(self, command: SessionCommand, reply: Reply) -> None:
        try:
            result = await self._execute(command)
        except DlkeeperError as error:
            if isinstance(error, WorkerGone):
                error = NotReady(f"the libtorrent worker restarted; retry ({error})")
            reply.fail(error)
            return
        reply.send(result)

    async def _execute(self, command: SessionCommand) -> Message:
        if isinstance(command, AwaitReplayed):
            await self._replayed.wait()
            return DoneReply()
        if isinstance(command, GetSessionStats):
            return SessionStatsReply(
                worker_restarts=self._restarts,
                resumed_at_start=self._resumed_at_start,
                resume_failures=self._resume_failures,
                worker_pid=self._worker.pid if self._worker is not None else None,
                heartbeat_age=(
                    time.monotonic() - self._last_heartbeat if self._last_heartbeat else None
                ),
            )
        if isinstance(command, RetryDownload):
            # Before any worker is needed: a replay by the next one must not trust it either.
            await self._forget_resume_data(command.record.task_id)
        # Every command is safe to repeat (a retried add answers like the first), so one that
        # met a dying worker is sent again to the next one; the replay restored the rest.
        try:
            worker = await self._ready_worker()
            try:
                return await self._execute_on(worker, command)
            except WorkerGone:
                return await self._execute_on(await self._ready_worker(replacing=worker), command)
        except NotReady:
            # A saved change the next worker's replay may have read too early: it is applied
            # from the saved state before that worker serves (see _resync).
            task_id = _task_of(command)
            if task_id is not None:
                self._unsynced.add(task_id)
            raise

    async def _execute_on(self, worker: WorkerProcess, command: SessionCommand) -> Message:
        timeout = self._options.request_timeout
        if isinstance(command, AddDownload):
            if command.fresh:
                sources = _Sources(command.torrent_b64, None, None)
            else:
                sources = await anyio.to_thread.run_sync(self._read_source, command.record)
            await self._add(worker, command.record, sources)
        elif isinstance(command, GetDownloadStatus):
            return await worker.request(
                lambda request_id: GetTorrentStatus(id=request_id, task_id=command.task_id),
                timeout,
                StatusReply,
            )
        elif isinstance(command, SaveAllResumeData):
            saved = await worker.request(
                lambda request_id: SaveResumeData(
                    id=request_id, only_if_modified=command.only_if_modified
                ),
                timeout,
                ResumeSavedReply,
            )
            await self._flush_worker_events()  # the files are written when this answers
            return saved
        elif isinstance(command, PauseDownload):
            await worker.request(
                lambda request_id: PauseTorrent(id=request_id, task_id=command.task_id),
                timeout,
                DoneReply,
            )
        elif isinstance(command, ResumeDownload):
            await worker.request(
                lambda request_id: ResumeTorrent(id=request_id, task_id=command.task_id),
                timeout,
                DoneReply,
            )
            if self._space:  # resumed onto a full disk: it waits, before libtorrent starts it
                try:
                    await self._look_at_space(worker)
                except WorkerGone:
                    raise
                except DlkeeperError as exc:  # the resume is done; the next look holds it
                    log.warning("cannot look at the disk space downloads wait for: %s", exc)
        elif isinstance(command, SetDownloadFiles):
            await worker.request(
                lambda request_id: SetTorrentFiles(
                    id=request_id, task_id=command.task_id, file_priorities=command.file_priorities
                ),
                timeout,
                FilePrioritiesReply,
            )
        elif isinstance(command, RemoveDownload):
            await self._remove(worker, command)
        elif isinstance(command, RetryDownload):
            await self._retry(worker, command.record)
        return DoneReply()

    async def _retry(self, worker: WorkerProcess, record: DownloadRecord) -> None:
        """Adds a failed download again without resume data (see `RetryDownload`)."""
        task_id = record.task_id
        self._forgotten.add(task_id)  # what the failed one still sends is dropped
        with contextlib.suppress(NotFound):  # not in the session: it failed to replay, say
            await worker.request(
                lambda request_id: RemoveTorrent(id=request_id, task_id=task_id),
                self._options.request_timeout,
                DoneReply,
            )
        await self._flush_worker_events()
        await self._forget_resume_data(task_id)  # one the old torrent saved meanwhile, too
        source = await anyio.to_thread.run_sync(self._read_source, record)
        await self._add(worker, record, _Sources(source.torrent_b64, None, source.problem))

    async def _forget_resume_data(self, task_id: str) -> None:
        """Deletes a download's .fastresume, and drops its resume writes waiting for a retry:
        they claim pieces of files that a retry checks again."""
        self._unwritten_resume.pop(task_id, None)
        self._problems.clear(_resume_problem(task_id))
        path = self._options.layout.resume_path(task_id)
        with contextlib.suppress(FileNotFoundError):
            await anyio.to_thread.run_sync(path.unlink)

    async def _remove(self, worker: WorkerProcess, command: RemoveDownload) -> None:
        """Takes the download out of the session and deletes its .torrent copy and resume data
        (a forgotten download must not come back with a `rebuild`, nor under a reused id)."""
        self._forgotten.add(command.task_id)
        with contextlib.suppress(NotFound):  # not in the session: it failed to replay, say
            await worker.request(
                lambda request_id: RemoveTorrent(
                    id=request_id, task_id=command.task_id, delete_files=command.delete_files
                ),
                self._options.request_timeout,
                DoneReply,
            )
        await self._flush_worker_events()
        self._drop_failed_writes(command.task_id)
        for path in (
            self._options.layout.resume_path(command.task_id),
            self._options.layout.torrent_path(command.task_id),
        ):
            with contextlib.suppress(FileNotFoundError):
                await anyio.to_thread.run_sync(path.unlink)

    async def _ready_worker(self, replacing: WorkerProcess | None = None) -> WorkerProcess:
        """The running worker (other than `replacing`); during a restart, waits for the next
        one, for at most `request_timeout`, then raises `NotReady`."""
        with anyio.move_on_after(self._options.request_timeout):
            while self._worker is None or not self._worker_ready or self._worker is replacing:
                await self._worker_changed.wait()
            return self._worker
        raise NotReady("the libtorrent worker is restarting; retry shortly")

    async def _shut_down(self) -> None:
        """Saves resume data of every download (bounded by shutdown_timeout), stops the worker."""
        with anyio.CancelScope(shield=True):
            self._stopping = True  # from now on the worker's exit is no reason for a restart
            worker = self._worker
            try:
                with anyio.move_on_after(self._options.shutdown_timeout) as scope:
                    if worker is not None and self._worker_ready:
                        with contextlib.suppress(DlkeeperError):
                            await worker.request(
                                lambda request_id: SaveResumeData(
                                    id=request_id, only_if_modified=True
                                ),
                                self._options.shutdown_timeout,
                                ResumeSavedReply,
                            )
                    await self._flush_worker_events()  # the resume data reaches the disk
                    if self._has_failed_writes():
                        await self._retry_writes_in_order()  # once more, before it is lost
                if scope.cancelled_caught:
                    log.warning(
                        "resume data not all saved within shutdown_timeout (%g s)",
                        self._options.shutdown_timeout,
                    )
            finally:
                if self._has_failed_writes():
                    log.error(
                        "stopping with the resume data of %d download(s) and the finish of %d "
                        "not kept (see problems above): they start from older data next time",
                        len(self._unwritten_resume),
                        len(self._unrecorded_finish),
                    )
                if worker is not None:
                    await worker.close(self._options.worker_stop_timeout)


@dataclass(frozen=True)
class _Sources:
    """A download's .torrent and resume data as the worker takes them (base64), and why its
    .torrent could not be used, if so."""

    torrent_b64: str | None
    resume_b64: str | None
    problem: str | None


@dataclass
class _Flush:
    """A marker in the worker's event queue: `done` is set when the handler reaches it."""

    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _RetryWrites:
    """A marker in the worker's event queue: the handler retries the failed writes there, then
    sets `done`."""

    done: anyio.Event = field(default_factory=anyio.Event)


def _resume_problem(task_id: str) -> str:
    return f"resume:{task_id}"


def _finish_problem(task_id: str) -> str:
    return f"finish:{task_id}"


async def resolve_peers(peers: tuple[str, ...]) -> tuple[str, ...]:
    """`host:port` peers with host names resolved to addresses (libtorrent takes addresses)."""
    resolved: list[str] = []
    for peer in peers:
        host, _, port = peer.rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = await anyio.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except (OSError, ValueError) as exc:
                log.warning("peer %s skipped: cannot resolve %s: %s", peer, host, exc)
                continue
            address = str(infos[0][4][0])
            resolved.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        else:
            resolved.append(peer)
    return tuple(resolved)


def _wait_for_space(task_ids: tuple[str, ...], reason: str) -> Callable[[int], WaitForSpace]:
    return lambda request_id: WaitForSpace(id=request_id, task_ids=task_ids, reason=reason)


def _task_of(command: SessionCommand) -> str | None:
    """The download a command changes, if it changes one."""
    if isinstance(command, AddDownload | RetryDownload):
        return command.record.task_id
    if isinstance(command, PauseDownload | ResumeDownload | RemoveDownload | SetDownloadFiles):
        return command.task_id
    return None


def _reason(exc: BaseException) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class Session:
    """A typed handle on the session actor."""

    def __init__(self, ref: ActorRef[SessionCommand], timeout: float = 120.0) -> None:
        self.ref = ref
        self._timeout = timeout

    async def wait_replayed(self, timeout: float) -> None:
        """Returns once the first worker is up and every persisted download is in it."""
        await self.ref.ask(AwaitReplayed(), timeout=timeout)

    async def add(
        self, record: DownloadRecord, *, fresh: bool = False, torrent: bytes | None = None
    ) -> None:
        """Puts a saved download into the session. `fresh`: it was just added, with `torrent`
        (the bytes of its .torrent copy) or a magnet, and has no resume data yet."""
        command = AddDownload(record=record, fresh=fresh, torrent_b64=_b64(torrent))
        await self.ref.ask(command, timeout=self._timeout)

    async def pause(self, task_id: str) -> None:
        await self.ref.ask(PauseDownload(task_id=task_id), timeout=self._timeout)

    async def resume(self, task_id: str) -> None:
        await self.ref.ask(ResumeDownload(task_id=task_id), timeout=self._timeout)

    async def remove(self, task_id: str, *, delete_files: bool = False) -> None:
        await self.ref.ask(
            RemoveDownload(task_id=task_id, delete_files=delete_files), timeout=self._timeout
        )

    async def retry(self, record: DownloadRecord) -> None:
        """Starts a failed download again as `record` (saved active), checking its files."""
        await self.ref.ask(RetryDownload(record=record), timeout=self._timeout)

    async def set_files(self, task_id: str, priorities: tuple[int, ...]) -> None:
        await self.ref.ask(
            SetDownloadFiles(task_id=task_id, file_priorities=priorities), timeout=self._timeout
        )

    async def status(self, task_id: str | None = None) -> tuple[TorrentStatus, ...]:
        reply = await self.ref.ask(GetDownloadStatus(task_id=task_id), timeout=self._timeout)
        return expect(reply, StatusReply).torrents

    async def save_resume_data(self, *, only_if_modified: bool = True) -> ResumeSavedReply:
        reply = await self.ref.ask(
            SaveAllResumeData(only_if_modified=only_if_modified), timeout=self._timeout
        )
        return expect(reply, ResumeSavedReply)

    async def stats(self) -> SessionStatsReply:
        reply = await self.ref.ask(GetSessionStats(), timeout=self._timeout)
        return expect(reply, SessionStatsReply)
