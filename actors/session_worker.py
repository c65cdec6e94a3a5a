"""The session worker: the child process that owns the libtorrent session, and nothing else.

Started by the session actor as `python -m actors.session_worker`. It reads one JSON command
per line on stdin and writes replies and events, one JSON object per line, on stdout; logs go to
stderr. The first command configures the session; the worker answers it with `ready` (or with
`settings_rejected`). After that it is driven by libtorrent's alerts, not by polling: libtorrent
writes a byte to a pipe when alerts are waiting, and one `select()` waits on that pipe and on
stdin together, so a finished torrent is reported as soon as libtorrent says so.

This is the only module that imports libtorrent; libtorrent objects never leave it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import libtorrent as lt
import orjson
from pydantic import ValidationError

from actors.errors import BadRequest, DlkeeperError, InvalidMagnet, InvalidTorrent, NotFound
from actors.messages.base import DoneReply, Message
from actors.messages.worker import (
    WORKER_REQUESTS,
    AddTorrent,
    ConfigureSession,
    FileEntry,
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
    SettingsRejected,
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
    WireError,
    WorkerReady,
    WorkerReply,
    WorkerRequest,
    WorkerResult,
)

log = logging.getLogger("dlkeeper.worker")

_ALERT_MASK = (
    lt.alert.category_t.error_notification
    | lt.alert.category_t.status_notification
    | lt.alert.category_t.storage_notification
)

# dlkeeper's session defaults; the config's [libtorrent] table is applied over them.
DEFAULT_SETTINGS: dict[str, str | int | bool] = {
    "user_agent": "dlkeeper/libtorrent-" + lt.__version__,
    "alert_mask": int(_ALERT_MASK),
    "alert_queue_size": 10_000,
}

_SAVE_RESUME_FLAGS = lt.torrent_handle.save_info_dict | lt.torrent_handle.flush_disk_cache
# torrent_handle::query_save_path, which the bindings do not name: status() with only it.
_QUERY_SAVE_PATH = 1 << 7
FLUSH_TIMEOUT = 5.0  # seconds to wait for a cache_flushed_alert before giving up on it
# A write failing with one of these waits for space; any other file error fails the download.
OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def check_settings(settings: dict[str, str | int | bool]) -> tuple[str, str] | None:
    """The first unknown or mistyped `settings_pack` key and why, or None when all are fine."""
    known: dict[str, object] = dict(lt.default_settings())
    for key, value in settings.items():
        if key not in known:
            return key, "unknown libtorrent setting"
        expected = type(known[key])
        if type(value) is not expected:
            names = {bool: "a boolean", int: "an integer", str: "a string"}
            return key, f"must be {names[expected]}, got {value!r}"
        # libtorrent keeps integer settings in a C int: a bigger value would wrap around.
        if expected is int and not _INT_MIN <= int(value) <= _INT_MAX:
            return key, f"must be between {_INT_MIN} and {_INT_MAX}, got {value!r}"
    return None


_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def info_hash_of(hashes: Any) -> str:
    """The info hash dlkeeper uses: v1 (SHA-1) hex, or the v2 (SHA-256) hex for v2-only."""
    return str(hashes.v1) if hashes.has_v1() else str(hashes.v2)


def all_info_hashes(hashes: Any) -> list[str]:
    """Every hex info hash a torrent is known by: v1, v2 or both."""
    known = []
    if hashes.has_v1():
        known.append(str(hashes.v1))
    if hashes.has_v2():
        known.append(str(hashes.v2))
    return known


def parse_peer(peer: str) -> tuple[str, int]:
    """`"host:port"` or `"[v6]:port"` to a (host, port) pair; raises `BadRequest`."""
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"peer {peer!r} is not host:port")
    return host.strip("[]"), int(port)


def real_files(storage: Any) -> list[int]:
    """Indices of the files a user sees: all but the padding files of v2/hybrid torrents."""
    pad = lt.file_storage.flag_pad_file
    return [index for index in range(storage.num_files()) if not storage.file_flags(index) & pad]


def libtorrent_priorities(info: Any, priorities: tuple[int, ...]) -> list[int]:
    """A user's priorities (one per real file) as libtorrent's list (one per file, pads 0).

    Raises `BadRequest` when the count does not match the torrent's files.
    """
    storage = info.layout()
    files = real_files(storage)
    if len(priorities) != len(files):
        raise BadRequest(
            f"file_priorities has {len(priorities)} entries; the torrent has {len(files)} files"
        )
    full = [0] * storage.num_files()
    for index, priority in zip(files, priorities, strict=True):
        full[index] = priority
    return full


@dataclass
class _Torrent:
    task_id: str
    handle: Any
    info_hash: str
    save_path: str
    pending_priorities: tuple[int, ...] | None = None
    last_state: str = ""
    # libtorrent hashes blocks before it has written them, so "have" (and "finished") can run
    # ahead of the files. Resume data and the finish are held until a disk flush requested
    # after them has completed: flushes requested, flushes completed (they complete in order).
    flushes_requested: int = 0
    flushes_completed: int = 0
    held_resume: list[tuple[int, bytes, float]] = field(default_factory=list)
    finish_held_until: int | None = None
    held_since: float = 0.0
    # Held for want of disk space (WaitForSpace): why, and whether it runs once space is back.
    waiting_for_space: str | None = None
    run_after_wait: bool = False
    checking_fit: bool = False  # a magnet's metadata arrived: in upload mode until SpaceBack

    def request_flush(self) -> int:
        """Asks libtorrent to write what it holds; returns the flush's number."""
        self.flushes_requested += 1
        if not self.held_resume and self.finish_held_until is None:
            self.held_since = time.monotonic()
        if self.handle.status(0).has_metadata:
            self.handle.flush_cache()
        else:
            self.flushes_completed += 1  # no files yet, nothing to write (and no alert comes)
        return self.flushes_requested

    def holds_anything(self) -> bool:
        return bool(self.held_resume) or self.finish_held_until is not None

    def payload_files(self) -> tuple[str, ...]:
        """The absolute paths of every file this download may hold bytes in: each of its files
        (whatever its priority now: it may have been wanted before) and libtorrent's part file,
        which keeps the pieces of priority-0 files. Empty without metadata."""
        if not self.handle.status(0).has_metadata:
            return ()
        save_path = self.handle.status(_QUERY_SAVE_PATH).save_path
        storage = self.handle.torrent_file().layout()
        folder = Path(save_path)
        paths = [str(folder / storage.file_path(index)) for index in real_files(storage)]
        # Named after the best hash: v1, or the truncated v2 of a v2 or hybrid torrent.
        paths.append(str(folder / f".{self.handle.info_hashes().get_best()}.parts"))
        return tuple(paths)


@dataclass
class _PendingAdd:
    """An add libtorrent has not confirmed yet, every request (retries too) it answers, and
    the commands for its download that came meanwhile: they run, in order, once it is added."""

    request: AddTorrent
    request_ids: list[int]
    waiting: list[WorkerRequest] = field(default_factory=list)


@dataclass
class _PendingSave:
    """A `save_resume_data` request answered once every download it names has been saved."""

    request_id: int
    waiting: set[str]
    saved: int = 0
    failed: int = 0


@dataclass
class SessionWorker:
    """The worker's state and its command and alert handlers (single-threaded)."""

    send: Callable[[Message], None]
    session: Any = None
    torrents: dict[str, _Torrent] = field(default_factory=dict)
    by_handle: dict[Any, str] = field(default_factory=dict)  # torrent handle -> task_id
    by_hash: dict[str, str] = field(default_factory=dict)  # v1 and v2 info hash -> task_id
    adding: dict[str, _PendingAdd] = field(default_factory=dict)  # info hash -> its add
    saves: list[_PendingSave] = field(default_factory=list)

    # --- commands -------------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        request_id = 0
        try:
            data = orjson.loads(line)
            if isinstance(data, dict) and isinstance(data.get("id"), int):
                request_id = data["id"]
            request = WORKER_REQUESTS.validate_python(data)
            self.handle(request)
        except (orjson.JSONDecodeError, ValidationError) as exc:
            self.reply_error(request_id, BadRequest(f"malformed worker command: {exc}"))
        except DlkeeperError as exc:
            self.reply_error(request_id, exc)
        except Exception as exc:
            log.exception("command failed")
            self.reply_error(request_id, exc)

    def handle(self, request: WorkerRequest) -> None:
        if isinstance(request, ConfigureSession):
            self.configure(request)
            return
        if self.session is None:
            raise BadRequest("the session is not configured yet")
        task_id = getattr(request, "task_id", None)
        if task_id is not None and not isinstance(request, AddTorrent):
            pending = self.pending_add(task_id)
            if pending is not None:  # not `not_found`: it is being added, and this follows it
                pending.waiting.append(request)
                return
        if isinstance(request, AddTorrent):
            self.add(request)
        elif isinstance(request, PauseTorrent):
            torrent = self.torrent(request.task_id)
            torrent.run_after_wait = False  # waiting for space: it stays paused after
            torrent.handle.unset_flags(lt.torrent_flags.auto_managed)
            torrent.handle.pause()
            self.request_save({request.task_id})
            self.reply(request.id, DoneReply())
        elif isinstance(request, ResumeTorrent):
            torrent = self.torrent(request.task_id)
            if torrent.waiting_for_space is not None:
                torrent.run_after_wait = True  # it goes on once space is back, not now
            else:
                # Back to libtorrent's queue, which starts it at its next tick (see add()).
                torrent.handle.set_flags(lt.torrent_flags.auto_managed)
            self.reply(request.id, DoneReply())
        elif isinstance(request, RemoveTorrent):
            self.remove(request)
        elif isinstance(request, SetTorrentFiles):
            self.set_priorities(request)
        elif isinstance(request, GetTorrentStatus):
            self.status(request)
        elif isinstance(request, SaveResumeData):
            self.save_resume_data(request)
        elif isinstance(request, WaitForSpace):
            for task_id in request.task_ids:
                if task_id in self.torrents:
                    self.wait_for_space(self.torrents[task_id], request.reason)
            self.reply(request.id, DoneReply())
        elif isinstance(request, SpaceBack):
            for task_id in request.task_ids:
                if task_id in self.torrents:
                    self.space_back(self.torrents[task_id])
            self.reply(request.id, DoneReply())
        elif isinstance(request, Ping):
            self.reply(request.id, PongReply(torrents=len(self.torrents)))

    def configure(self, request: ConfigureSession) -> None:
        if self.session is not None:
            raise BadRequest("the session is already configured")
        rejected = check_settings(request.settings)
        if rejected is not None:
            self.send(SettingsRejected(key=rejected[0], reason=rejected[1]))
            return
        settings = {**DEFAULT_SETTINGS, **request.settings}
        # A configured alert_mask may add alerts, never take away the ones the worker runs on.
        settings["alert_mask"] = int(settings["alert_mask"]) | int(_ALERT_MASK)
        self.session = lt.session(cast("lt.settings_pack", settings))
        self.send(
            WorkerReady(libtorrent_version=lt.__version__, listen_port=self.session.listen_port())
        )

    def add(self, request: AddTorrent) -> None:
        present = self.torrents.get(request.task_id)
        if present is not None:  # a retried add: answer as the first one was answered
            self.reply_added(request.id, present)
            return
        pending = self.pending_add(request.task_id)
        if pending is not None:
            pending.request_ids.append(request.id)
            return
        params = self.add_params(request)
        params.save_path = request.save_path
        if request.file_priorities and params.ti is not None:
            try:
                params.file_priorities = libtorrent_priorities(params.ti, request.file_priorities)
            except BadRequest as exc:  # as when a magnet's metadata arrives: never a lost download
                log.warning("%s: %s; downloading every file", request.task_id, exc)
        for peer in request.peers:
            try:
                params.peers = [*params.peers, parse_peer(peer)]
            except (BadRequest, TypeError, ValueError) as exc:  # libtorrent takes addresses only
                log.warning("%s: peer %s skipped: %s", request.task_id, peer, exc)
        # A running download goes to libtorrent's queue (paused and auto-managed): the queue
        # starts it at its next tick and keeps at most active_downloads running at once. A
        # paused one is taken out of the queue and stays paused until resumed.
        flags = params.flags | lt.torrent_flags.duplicate_is_error | lt.torrent_flags.paused
        # Resume data saved while the disk was full says upload mode (see space_back): a
        # restart tries the disk again instead of seeding only.
        flags &= ~lt.torrent_flags.upload_mode
        if request.paused or request.wait_for_space is not None:
            flags &= ~lt.torrent_flags.auto_managed
        else:
            flags |= lt.torrent_flags.auto_managed
        params.flags = flags
        info_hash = info_hash_of(params.ti.info_hashes() if params.ti else params.info_hashes)
        if info_hash in self.adding or info_hash in self.by_hash:
            other = self.by_hash.get(info_hash) or self.adding[info_hash].request.task_id
            raise BadRequest(f"torrent {info_hash} is already in the session as {other}")
        self.adding[info_hash] = _PendingAdd(request, [request.id])
        self.session.async_add_torrent(params)

    def pending_add(self, task_id: str) -> _PendingAdd | None:
        return next((p for p in self.adding.values() if p.request.task_id == task_id), None)

    def add_params(self, request: AddTorrent) -> Any:
        """The add_torrent_params: the resume data when it is readable and of this torrent,
        else the .torrent or the magnet alone (which costs a check, never the download)."""
        source: Any = None
        if request.torrent_b64:
            try:
                source = lt.add_torrent_params()
                source.ti = lt.torrent_info(base64.b64decode(request.torrent_b64))
            except RuntimeError as exc:
                raise InvalidTorrent(f"not a valid .torrent: {exc}") from None
        elif request.magnet:
            try:
                source = lt.parse_magnet_uri(request.magnet)
            except RuntimeError as exc:
                raise InvalidMagnet(f"not a valid magnet link: {exc}") from None
        resume = self.resume_params(request, source)
        if resume is None:
            if source is None:
                raise BadRequest("an add needs torrent_b64, magnet or resume_b64")
            return source
        if source is not None:
            resume.peers = list(resume.peers) + list(source.peers)
            if resume.ti is None:
                resume.ti = source.ti
        return resume

    def resume_params(self, request: AddTorrent, source: Any) -> Any:
        if not request.resume_b64:
            return None
        try:
            resume = lt.read_resume_data(base64.b64decode(request.resume_b64))
        except RuntimeError as exc:
            log.warning("%s: resume data unreadable (%s); adding without it", request.task_id, exc)
            return None
        if source is not None:
            expected = source.ti.info_hashes() if source.ti else source.info_hashes
            found = resume.ti.info_hashes() if resume.ti else resume.info_hashes
            if info_hash_of(expected) != info_hash_of(found):
                log.warning(
                    "%s: resume data is of another torrent (%s); adding without it",
                    request.task_id,
                    info_hash_of(found),
                )
                return None
        return resume

    def torrent(self, task_id: str) -> _Torrent:
        torrent = self.torrents.get(task_id)
        if torrent is None:
            raise NotFound(task_id)
        return torrent

    def remove(self, request: RemoveTorrent) -> None:
        torrent = self.torrents.pop(request.task_id, None)
        if torrent is None:
            raise NotFound(request.task_id)
        self.forget(torrent)
        flags = lt.session.delete_files if request.delete_files else 0
        self.session.remove_torrent(torrent.handle, flags)
        self.forget_saves(request.task_id)
        self.reply(request.id, DoneReply())

    def set_priorities(self, request: SetTorrentFiles) -> None:
        torrent = self.torrent(request.task_id)
        if not torrent.handle.status(0).has_metadata:
            torrent.pending_priorities = request.file_priorities
            self.reply(request.id, FilePrioritiesReply(applied=False))
            return
        info = torrent.handle.torrent_file()
        torrent.handle.prioritize_files(libtorrent_priorities(info, request.file_priorities))
        self.reply(request.id, FilePrioritiesReply(applied=True))

    def status(self, request: GetTorrentStatus) -> None:
        if request.task_id is not None:
            chosen = [self.torrent(request.task_id)]
        else:
            chosen = list(self.torrents.values())
        statuses = tuple(self.torrent_status(t) for t in chosen)
        self.reply(request.id, StatusReply(torrents=statuses))

    def torrent_status(self, torrent: _Torrent) -> TorrentStatus:
        status = torrent.handle.status()
        files: tuple[FileEntry, ...] = ()
        if status.has_metadata:
            storage = torrent.handle.torrent_file().layout()
            priorities = torrent.handle.get_file_priorities()
            files = tuple(
                FileEntry(
                    path=storage.file_path(index),
                    size=storage.file_size(index),
                    priority=int(priorities[index]),
                )
                for index in real_files(storage)
            )
        flags = status.flags
        return TorrentStatus(
            task_id=torrent.task_id,
            info_hash=torrent.info_hash,
            name=status.name,
            state=str(status.state),
            paused=bool(flags & lt.torrent_flags.paused),
            auto_managed=bool(flags & lt.torrent_flags.auto_managed),
            finished=status.is_finished,
            has_metadata=status.has_metadata,
            progress=status.progress,
            total_bytes=status.total_wanted,
            downloaded_bytes=status.total_wanted_done,
            download_rate=status.download_payload_rate,
            upload_rate=status.upload_payload_rate,
            num_peers=status.num_peers,
            error=status.errc.message() if status.errc.value() else None,
            files=files,
            save_path=torrent.save_path,
            waiting_for_space=torrent.waiting_for_space,
        )

    def out_of_space(self, torrent: _Torrent, error: str) -> None:
        """A write of `torrent` failed for want of space: it waits, and so do the others that
        write to the same folder, at once (libtorrent's queue would start one in its place);
        the session then holds every download on that file system, and says when to go on."""
        reason = f"waiting for disk space: {error}"
        self.wait_for_space(torrent, reason)
        for other in self.torrents.values():
            if other.save_path == torrent.save_path and other.waiting_for_space is None:
                flags = other.handle.flags()
                if flags & lt.torrent_flags.auto_managed and not other.handle.status(0).is_finished:
                    self.wait_for_space(other, reason)
        self.send(
            TorrentOutOfSpace(task_id=torrent.task_id, error=error, save_path=torrent.save_path)
        )

    def wait_for_space(self, torrent: _Torrent, reason: str) -> None:
        """Holds `torrent` until `space_back` (see `WaitForSpace`)."""
        if torrent.waiting_for_space is None:
            flags = torrent.handle.flags()
            torrent.run_after_wait = bool(flags & lt.torrent_flags.auto_managed)
            torrent.handle.unset_flags(lt.torrent_flags.auto_managed)
            torrent.handle.pause()
        # EDQUOT puts the torrent in libtorrent's error state (ENOSPC only in upload mode):
        # here that is a wait, not a failure.
        torrent.handle.clear_error()
        torrent.waiting_for_space = reason

    def space_back(self, torrent: _Torrent) -> None:
        """Lets a download held by `wait_for_space` go on as it was (see `SpaceBack`)."""
        if torrent.checking_fit:
            torrent.checking_fit = False
            torrent.handle.unset_flags(lt.torrent_flags.upload_mode)
        if torrent.waiting_for_space is None:
            return
        torrent.waiting_for_space = None
        torrent.handle.clear_error()
        # After a write failed for want of space libtorrent stops downloading (upload mode),
        # and only takes the torrent out of that after optimistic_disk_retry (10 minutes).
        torrent.handle.unset_flags(lt.torrent_flags.upload_mode)
        if torrent.run_after_wait:
            torrent.handle.set_flags(lt.torrent_flags.auto_managed)

    def save_resume_data(self, request: SaveResumeData) -> None:
        if request.task_id is not None:
            self.torrent(request.task_id)  # not_found for an unknown download
            chosen = {request.task_id}
        else:
            chosen = {
                task_id
                for task_id, torrent in self.torrents.items()
                if not request.only_if_modified or torrent.handle.need_save_resume_data()
            }
        pending = _PendingSave(request.id, set(chosen))
        self.request_save(chosen)
        if chosen:
            self.saves.append(pending)
        else:
            self.reply(request.id, ResumeSavedReply(saved=0, failed=0))

    def request_save(self, task_ids: set[str]) -> None:
        for task_id in task_ids:
            self.torrents[task_id].handle.save_resume_data(_SAVE_RESUME_FLAGS)

    def forget_saves(self, task_id: str) -> None:
        self.resume_saved(task_id, saved=False)

    def resume_saved(self, task_id: str, *, saved: bool) -> None:
        for pending in list(self.saves):
            if task_id in pending.waiting:
                pending.waiting.discard(task_id)
                if saved:
                    pending.saved += 1
                else:
                    pending.failed += 1
                if not pending.waiting:
                    self.saves.remove(pending)
                    self.reply(
                        pending.request_id,
                        ResumeSavedReply(saved=pending.saved, failed=pending.failed),
                    )

    # --- alerts ---------------------------------------------------------------------------------

    def process_alerts(self) -> None:
        for alert in self.session.pop_alerts():
            try:
                self.on_alert(alert)
            except Exception:
                log.exception("while handling %s", type(alert).__name__)

    def on_alert(self, alert: Any) -> None:
        if isinstance(alert, lt.add_torrent_alert):
            self.on_added(alert)
            return
        task_id = self.task_of(alert)
        if task_id is None:
            return
        torrent = self.torrents[task_id]
        if isinstance(alert, lt.metadata_received_alert):
            # A v2 torrent's piece layers arrive later, with the pieces; the info dict (and so
            # the info hash) is complete now, and the resume data will carry the layers.
            params = lt.add_torrent_params()
            params.ti = alert.handle.torrent_file()
            entry = lt.write_torrent_file(params, lt.write_flags.allow_missing_piece_layer)
            torrent_bytes = lt.bencode(cast(Any, entry))
            if torrent.pending_priorities is not None:
                try:
                    full = libtorrent_priorities(params.ti, torrent.pending_priorities)
                except BadRequest as exc:
                    log.warning("%s: %s; downloading every file", task_id, exc)
                else:
                    alert.handle.prioritize_files(full)
                torrent.pending_priorities = None
            self.remember(torrent)  # now under its v1 hash too, for hybrid torrents
            if torrent.waiting_for_space is None:
                # No writes until the session has seen that its files fit: it answers SpaceBack,
                # or WaitForSpace when they do not. Upload mode, not a pause, which would drop
                # the peers that gave the metadata (reconnected only after min_reconnect_time).
                torrent.handle.set_flags(lt.torrent_flags.upload_mode)
                torrent.checking_fit = True
            self.send(MetadataReceived(task_id=task_id, torrent_b64=_b64(torrent_bytes)))
        elif isinstance(alert, lt.torrent_finished_alert):
            torrent.finish_held_until = torrent.request_flush()
            self.release_held(torrent)
        elif isinstance(alert, lt.save_resume_data_alert):
            data = lt.write_resume_data_buf(alert.params)
            progress = torrent.handle.status(0).progress
            torrent.held_resume.append((torrent.request_flush(), data, progress))
            self.release_held(torrent)
        elif isinstance(alert, lt.cache_flushed_alert):
            torrent.flushes_completed += 1
            self.release_held(torrent)
        elif isinstance(alert, lt.save_resume_data_failed_alert):
            log.warning("%s: resume data not saved: %s", task_id, alert.message())
            self.resume_saved(task_id, saved=False)
        elif isinstance(alert, lt.file_error_alert | lt.torrent_error_alert):
            self.on_error(torrent, alert)
        elif isinstance(alert, lt.state_changed_alert):
            state, previous = str(alert.state), str(alert.prev_state)
            torrent.last_state = state
            self.send(TorrentStateChanged(task_id=task_id, state=state, previous=previous))
        elif isinstance(alert, lt.fastresume_rejected_alert):
            log.warning("%s: resume data rejected: %s", task_id, alert.message())

    def on_error(self, torrent: _Torrent, alert: Any) -> None:
        """A file or torrent error: out of space, it waits (see `out_of_space`); else it fails."""
        if torrent.waiting_for_space is not None:
            # What the writes that failed cause (a hybrid torrent's pieces then fail one of
            # their two hashes) is no failure of the download: it comes back, if it is one.
            if not _is_out_of_space(alert.error):  # every write in flight fails: not those
                log.info("%s: %s (while waiting for disk space)", torrent.task_id, alert.message())
            torrent.handle.clear_error()
        elif _is_out_of_space(alert.error):
            self.out_of_space(torrent, alert.message())
        else:
            self.send(TorrentFailed(task_id=torrent.task_id, error=alert.message()))

    def task_of(self, alert: Any) -> str | None:
        handle = getattr(alert, "handle", None)
        if handle is None or not handle.is_valid():
            return None
        return self.by_handle.get(handle)

    def remember(self, torrent: _Torrent) -> None:
        self.torrents[torrent.task_id] = torrent
        self.by_handle[torrent.handle] = torrent.task_id
        for info_hash in all_info_hashes(torrent.handle.info_hashes()):
            self.by_hash[info_hash] = torrent.task_id

    def forget(self, torrent: _Torrent) -> None:
        self.by_handle.pop(torrent.handle, None)
        for info_hash in all_info_hashes(torrent.handle.info_hashes()):
            self.by_hash.pop(info_hash, None)

    def on_added(self, alert: Any) -> None:
        params = alert.params
        info_hash = info_hash_of(params.ti.info_hashes() if params.ti else params.info_hashes)
        pending = self.adding.pop(info_hash, None)
        if pending is None:
            return
        request = pending.request
        if alert.error.value():
            error = BadRequest(f"libtorrent refused the torrent: {alert.error.message()}")
            for request_id in pending.request_ids:
                self.reply_error(request_id, error)
            self.run_waiting(pending)  # not in the session: they find it so
            return
        # The hash it was added by stays its name (a v2 magnet's, say), even once metadata
        # tells the v1 hash of a hybrid torrent too.
        torrent = _Torrent(request.task_id, alert.handle, info_hash, request.save_path)
        if request.wait_for_space is not None:  # added held (see add())
            torrent.waiting_for_space = request.wait_for_space
            torrent.run_after_wait = not request.paused
        if request.file_priorities and params.ti is None:
            torrent.pending_priorities = request.file_priorities  # applied when metadata arrives
        self.remember(torrent)
        for request_id in pending.request_ids:
            self.reply_added(request_id, torrent)
        self.run_waiting(pending)

    def run_waiting(self, pending: _PendingAdd) -> None:
        for request in pending.waiting:
            try:
                self.handle(request)
            except DlkeeperError as exc:
                self.reply_error(request.id, exc)
            except Exception as exc:
                log.exception("command failed")
                self.reply_error(request.id, exc)

    def reply_added(self, request_id: int, torrent: _Torrent) -> None:
        self.reply(request_id, TorrentAddedReply(info_hash=torrent.info_hash))

    def release_overdue(self) -> None:
        """Releases what waited more than FLUSH_TIMEOUT for a flush that never reported back."""
        now = time.monotonic()
        for torrent in self.torrents.values():
            if torrent.holds_anything() and now - torrent.held_since > FLUSH_TIMEOUT:
                log.warning("%s: no word of the disk flush; going on without it", torrent.task_id)
                torrent.flushes_completed = torrent.flushes_requested
                self.release_held(torrent)

    def release_held(self, torrent: _Torrent) -> None:
        """Sends what waited for the disk: resume data, then the finish (files now complete)."""
        done = torrent.flushes_completed
        while torrent.held_resume and torrent.held_resume[0][0] <= done:
            _, data, progress = torrent.held_resume.pop(0)
            # The parent makes these files durable before it keeps the resume data (an fsync
            # here would stop this loop, heartbeats included, for as long as the disk takes).
            self.send(
                ResumeDataSaved(
                    task_id=torrent.task_id,
                    resume_b64=_b64(data),
                    progress=progress,
                    payload_files=torrent.payload_files(),
                )
            )
            self.resume_saved(torrent.task_id, saved=True)
        if torrent.finish_held_until is not None and torrent.finish_held_until <= done:
            torrent.finish_held_until = None
            self.send(
                TorrentFinished(task_id=torrent.task_id, payload_files=torrent.payload_files())
            )
            self.request_save({torrent.task_id})

    # --- output ---------------------------------------------------------------------------------

    def reply(self, request_id: int, result: WorkerResult) -> None:
        self.send(WorkerReply(id=request_id, ok=True, result=result))

    def reply_error(self, request_id: int, error: BaseException) -> None:
        if isinstance(error, DlkeeperError):
            code, task_id, trace = error.code, error.task_id, None
        else:
            code, task_id, trace = "internal", None, traceback.format_exc()
        wire = WireError(
            code=code,
            message=str(error),
            task_id=task_id,
            type=type(error).__name__,
            traceback=trace,
        )
        self.send(WorkerReply(id=request_id, ok=False, error=wire))


def _is_out_of_space(error: Any) -> bool:
    """Whether libtorrent's error_code is ENOSPC or EDQUOT (an errno: system or generic)."""
    return error.category().name() in ("system", "generic") and (
        error.value() in OUT_OF_SPACE_ERRNOS
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _writer(stream: Any) -> Callable[[Message], None]:
    parent_gone = False

    def send(message: Message) -> None:
        nonlocal parent_gone
        if parent_gone:
            return
        try:
            stream.write(orjson.dumps(message.model_dump(mode="json")) + b"\n")
            stream.flush()
        except BrokenPipeError:
            # The daemon is gone; its end of stdin closes too, and the main loop then stops
            # the session in order (libtorrent writes what it holds).
            parent_gone = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())  # what is still buffered goes nowhere, quietly
            os.close(devnull)

    return send


def main() -> int:
    """Runs the worker until its stdin closes (the parent's way of saying stop)."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="worker %(levelname)s: %(message)s"
    )
    # The parent decides when to stop; a Ctrl-C in the daemon's terminal must not kill us first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = SessionWorker(send=_writer(sys.stdout.buffer))
    alert_read, alert_write = os.pipe()
    os.set_blocking(alert_write, False)
    os.set_blocking(alert_read, False)
    stdin = sys.stdin.buffer.fileno()
    buffered = bytearray()
    alert_fd_set = False
    while True:
        # A timeout only while something waits for a disk flush (see release_overdue).
        waiting = any(torrent.holds_anything() for torrent in worker.torrents.values())
        readable, _, _ = select.select([stdin, alert_read], [], [], 1.0 if waiting else None)
        if alert_read in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(alert_read, 4096)
        if stdin in readable:
            chunk = os.read(stdin, 1 << 20)
            if not chunk:
                return 0
            # Only the new chunk is searched: a line of many MiB arrives in many chunks.
            searched = len(buffered)
            buffered += chunk
            end = buffered.find(b"\n", searched)
            while end >= 0:
                line = bytes(buffered[:end])
                del buffered[: end + 1]
                if line.strip():
                    worker.handle_line(line)
                end = buffered.find(b"\n")
        if worker.session is not None:
            if not alert_fd_set:
                worker.session.set_alert_fd(alert_write)
                alert_fd_set = True
            worker.process_alerts()
            if waiting:
                worker.release_overdue()


if __name__ == "__main__":
    sys.exit(main())
