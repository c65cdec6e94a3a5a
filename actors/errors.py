"""dlkeeper's one error hierarchy, and its one mapping to and from the wire.

Every error that crosses an actor, a process or the socket is a `DlkeeperError`. The refusals a
client may see (CONTRACT.md section 2) are `RequestError`s, each class carrying the contract's
error code as `code`; everything else is `internal` to a client. An error about one download
carries its `task_id` as a field, on the wire too. Third-party exceptions are mapped to these at
the module that meets them. `error_body()` writes an error as the wire carries it and
`error_from_body()` reads it back: the daemon's socket, the libtorrent worker's pipe and the bot's
client all use these two.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

ErrorCode = Literal[
    "bad_request",
    "unknown_op",
    "not_found",
    "invalid_torrent",
    "invalid_magnet",
    "path_not_allowed",
    "duplicate",
    "too_large",
    "not_ready",
    "no_space",
    "internal",
]


class DlkeeperError(Exception):
    """Base of every dlkeeper error; `code` is what the message API reports."""

    code: ClassVar[ErrorCode] = "internal"
    task_id: str | None = None  # the download the error is about, when it is about one

    @property
    def message(self) -> str:
        """The one sentence that says what went wrong."""
        return str(self)


# --- the refusals a client may see (the contract's codes) ---------------------------------------


class RequestError(DlkeeperError):
    """A request was refused. Each subclass is one of the contract's error codes; a plain
    `RequestError` is what a client gets for `internal` or for a code it does not know."""


class BadRequest(RequestError):
    code = "bad_request"


class UnknownOp(RequestError):
    code = "unknown_op"


class NotFound(RequestError):
    code = "not_found"
    task_id: str

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no download {task_id}")
        self.task_id = task_id


class StaleChange(BadRequest):
    """A change made for a status the download no longer has (another change came first)."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(f"download {task_id} is {status} now")
        self.task_id = task_id


class InvalidTorrent(RequestError):
    code = "invalid_torrent"


class InvalidMagnet(RequestError):
    code = "invalid_magnet"


class PathNotAllowed(RequestError):
    code = "path_not_allowed"


class Duplicate(RequestError):
    """The download already exists; `task_id` names the existing one."""

    code = "duplicate"
    task_id: str

    def __init__(self, message: str, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TooLarge(RequestError):
    code = "too_large"


class NotReady(RequestError):
    code = "not_ready"


class NoSpace(RequestError):
    """An add does not fit: `needed_bytes` (what it wants, plus what the downloads in progress
    on that file system still need) is more than `free_bytes` less `min_free_bytes`."""

    code = "no_space"
    needed_bytes: int
    free_bytes: int

    def __init__(self, message: str, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


ERRORS_BY_CODE: dict[str, type[RequestError]] = {
    error.code: error
    for error in (
        BadRequest,
        UnknownOp,
        NotFound,
        InvalidTorrent,
        InvalidMagnet,
        PathNotAllowed,
        Duplicate,
        TooLarge,
        NotReady,
        NoSpace,
    )
}


def error_body(error: BaseException) -> dict[str, Any]:
    """`error` as the wire carries it: `{"code", "message"}`, with `task_id` for `duplicate` and
    `needed_bytes` and `free_bytes` for `no_space` (CONTRACT.md section 2). Anything that is
    not a `DlkeeperError` is `internal`, named by type only: a traceback's text is not for a
    client."""
    if not isinstance(error, DlkeeperError):
        return {"code": "internal", "message": f"internal error: {type(error).__name__}"}
    body: dict[str, Any] = {"code": error.code, "message": str(error)}
    if isinstance(error, Duplicate):
        body["task_id"] = error.task_id
    if isinstance(error, NoSpace):
        body["needed_bytes"] = error.needed_bytes
        body["free_bytes"] = error.free_bytes
    return body


def error_from_body(
    code: str,
    message: str,
    task_id: str | None = None,
    *,
    needed_bytes: int | None = None,
    free_bytes: int | None = None,
) -> RequestError:
    """The error a wire body stands for, as the shared class of its code, with the sender's
    sentence; a code this side does not know is a plain `RequestError` that says so. A
    `no_space` whose sender left out its figures has them as 0."""
    known = ERRORS_BY_CODE.get(code)
    if code == "internal":
        error = RequestError(message)
    elif known is None:
        error = RequestError(f"{message} (error code {code!r} is unknown to this client)")
    else:
        error = known.__new__(known)
        Exception.__init__(error, message)  # not the constructor: the sender wrote the sentence
    if task_id is not None or not isinstance(error, NotFound | Duplicate):
        error.task_id = task_id
    else:
        error.task_id = ""  # a sender that did not name the download
    if isinstance(error, NoSpace):
        error.needed_bytes = needed_bytes or 0
        error.free_bytes = free_bytes or 0
    return error


# --- configuration ------------------------------------------------------------------------------


class ConfigError(DlkeeperError):
    """A bad config file, flag or environment variable; `serve` exits 2 with this one line."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config error: {key}: {reason}")
        self.key = key
        self.reason = reason


class SocketInUse(DlkeeperError):
    """Another process answers on the socket path (or may): `serve` exits 1 naming the path."""


# --- actors -------------------------------------------------------------------------------------


class ActorError(DlkeeperError):
    """A failure talking to an actor, not a failure of the request itself."""


class ActorDied(ActorError):
    """The actor stopped (or crashed) before it could answer."""

    def __init__(self, actor: str, cause: BaseException | None = None) -> None:
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"actor {actor} is not running{reason}")
        self.actor = actor
        self.cause = cause


class AskTimeout(ActorError):
    """An `ask()` got no answer within its deadline."""

    def __init__(self, actor: str, message: str, timeout: float) -> None:
        super().__init__(f"actor {actor} did not answer {message} within {timeout:g} s")
        self.actor = actor


class MailboxFull(ActorError):
    """`tell_nowait()` found the actor's bounded mailbox full."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"mailbox of actor {actor} is full")
        self.actor = actor


# --- the libtorrent worker ----------------------------------------------------------------------


class WorkerGone(DlkeeperError):
    """The worker died (or was killed) before it answered."""


class WorkerTimeout(WorkerGone):
    """The worker did not answer in time: it hangs, and is treated as gone (killed, replaced)."""


class RestartIntensityExceeded(DlkeeperError):
    """The worker had to be restarted too often: the daemon gives up and lets systemd act."""


# --- the state file -----------------------------------------------------------------------------


class StorageMissing(DlkeeperError):
    """`library_path` or `download_path` is not there (a drive not mounted, say): dlkeeper never
    creates them, so `serve` exits 4 naming the path, and systemd tries again later."""


class StateError(DlkeeperError):
    """A problem with `downloads.json` or its lock."""


class StateLocked(StateError):
    """Another process holds the state lock; `serve` exits 3 naming `lock_path`."""

    def __init__(self, lock_path: Path) -> None:
        super().__init__(f"another dlkeeper holds the state lock {lock_path}")
        self.lock_path = lock_path


class CorruptState(StateError):
    """Bytes that are not a state file of any version this dlkeeper knows."""


class StateTooNew(StateError):
    """The state file was written by a newer dlkeeper; it is refused, never overwritten."""

    def __init__(self, path: Path, version: int, supported: int) -> None:
        super().__init__(
            f"{path} has schema version {version}, this dlkeeper reads up to {supported}; "
            "upgrade dlkeeper or restore an older state file"
        )
        self.path = path
        self.version = version


class StateWriteFailed(StateError):
    """The state could not be written (disk full, I/O error); the change was not made."""


# --- the bot's side of the socket ---------------------------------------------------------------


class DaemonUnavailable(DlkeeperError):
    """No answer from the daemon: it is not running, not reachable, or the connection broke
    before the reply came. The request may or may not have been applied."""

    def __init__(self, message: str, socket_path: Path) -> None:
        super().__init__(message)
        self.socket_path = socket_path


class DaemonNotRunning(DaemonUnavailable):
    """No daemon accepted a connection on the socket within `connect_timeout`."""


class RequestTimeout(DaemonUnavailable):
    """The daemon did not answer within `request_timeout`."""


class ProtocolError(DlkeeperError):
    """The daemon answered with a result that does not follow the contract (a version mismatch
    or a bug); the request itself was applied."""


# --- reading what an exception group holds ------------------------------------------------------


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`'s (nested) exception groups, in order; `exc` itself when it
    is not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def first_dlkeeper_error(exc: BaseException) -> DlkeeperError | None:
    """The error that explains `exc`: the first `DlkeeperError` in it (looking inside exception
    groups and at what killed an actor), preferring a root cause to an `ActorDied`."""
    found = list(_dlkeeper_errors(exc))
    causes = [error for error in found if not isinstance(error, ActorDied)]
    chosen = causes or found
    return chosen[0] if chosen else None


def _dlkeeper_errors(exc: BaseException) -> Iterator[DlkeeperError]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _dlkeeper_errors(inner)
    elif isinstance(exc, ActorDied) and exc.cause is not None:
        yield from _dlkeeper_errors(exc.cause)
        yield exc
    elif isinstance(exc, DlkeeperError):
        yield exc
