"""dlkeeper's one error hierarchy.

Every error that crosses an actor or the socket is a `DlkeeperError`. Errors the message API can
report carry the contract's error code (CONTRACT.md section 2) as the class attribute `code`;
everything else is `internal` to a client. Third-party exceptions are mapped to these at the
module that meets them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

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
    "internal",
]


class DlkeeperError(Exception):
    """Base of every dlkeeper error; `code` is what the message API reports."""

    code: ClassVar[ErrorCode] = "internal"


# --- errors a client may see (the contract's codes) ---------------------------------------------


class BadRequest(DlkeeperError):
    code = "bad_request"


class UnknownOp(DlkeeperError):
    code = "unknown_op"


class NotFound(DlkeeperError):
    code = "not_found"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no download {task_id}")
        self.task_id = task_id


class StaleChange(BadRequest):
    """A change made for a status the download no longer has (another change came first)."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(f"download {task_id} is {status} now")
        self.task_id = task_id


class InvalidTorrent(DlkeeperError):
    code = "invalid_torrent"


class InvalidMagnet(DlkeeperError):
    code = "invalid_magnet"


class PathNotAllowed(DlkeeperError):
    code = "path_not_allowed"


class Duplicate(DlkeeperError):
    """The download already exists; `task_id` names the existing one."""

    code = "duplicate"

    def __init__(self, message: str, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TooLarge(DlkeeperError):
    code = "too_large"


class NotReady(DlkeeperError):
    code = "not_ready"


# --- configuration ------------------------------------------------------------------------------


class ConfigError(DlkeeperError):
    """A bad config file, flag or environment variable; `serve` exits 2 with this one line."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config error: {key}: {reason}")
        self.key = key
        self.reason = reason


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


# --- the state file -----------------------------------------------------------------------------


class StateError(DlkeeperError):
    """A problem with `downloads.json` or its lock."""


class StateLocked(StateError):
    """Another process holds the state lock; `serve` exits 3 naming `lock_path`."""

    def __init__(self, lock_path: Path) -> None:
        super().__init__(f"another dlkeeper holds the state lock {lock_path}")
        self.lock_path = lock_path


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
