"""Configuration (CONTRACT section 1): a TOML file, `DLKEEPER_CONFIG`, and flags over both.

Every key has a default. A relative path in the file is taken from the file's folder, a relative
path in a flag from the working directory. Anything wrong is one `ConfigError` naming the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.errors import ConfigError
from actors.layout import Layout

CONFIG_ENV = "DLKEEPER_CONFIG"
DEFAULT_LIBRARY_PATH = Path("/srv/media")
DEFAULT_SOCKET = Path("/run/dlkeeper/api.sock")
# sun_path is 108 bytes with its terminating NUL (Linux).
MAX_SOCKET_PATH_BYTES = 107
DEFAULT_MIN_FREE_BYTES = 1 << 30  # 1 GiB

LibtorrentValue = str | int | bool


class ConfigFile(BaseModel):
    """What a config file may hold. Strict: `"60"` is not a number, `1` is not a path."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    library_path: str | None = Field(default=None, min_length=1)
    download_path: str | None = Field(default=None, min_length=1)
    socket: str | None = Field(default=None, min_length=1)
    resume_save_interval: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    shutdown_timeout: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    min_free_bytes: int = Field(default=DEFAULT_MIN_FREE_BYTES, ge=0)
    stall_timeout: float = Field(default=1800.0, ge=0, allow_inf_nan=False)
    libtorrent: dict[str, LibtorrentValue] = Field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """The daemon's settings, every path absolute."""

    library_path: Path = DEFAULT_LIBRARY_PATH
    download_path: Path = DEFAULT_LIBRARY_PATH / "downloads"
    socket: Path = DEFAULT_SOCKET
    resume_save_interval: float = 60.0
    shutdown_timeout: float = 5.0
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES  # kept free on download_path's file system
    stall_timeout: float = 1800.0  # seconds without payload bytes: stalled (0: never)
    libtorrent: Mapping[str, LibtorrentValue] = field(default_factory=dict)
    source: Path | None = None  # the config file read, if any

    @property
    def layout(self) -> Layout:
        """Where the library's state, .torrent copies and resume data live."""
        return Layout(self.library_path, self.download_path)


@dataclass(frozen=True)
class PathFlags:
    """Path flags given on the command line (None: not given)."""

    config: Path | None = None
    library_path: Path | None = None
    download_path: Path | None = None
    socket: Path | None = None


def load_config(flags: PathFlags, environ: Mapping[str, str] | None = None) -> Config:
    """Reads the config file named by `--config` or `DLKEEPER_CONFIG` (if any) and applies flags.

    With neither, the defaults apply. `download_path` defaults to `{library_path}/downloads`.
    Raises `ConfigError`.
    """
    environ = os.environ if environ is None else environ
    source = flags.config
    if source is None and environ.get(CONFIG_ENV):
        source = Path(environ[CONFIG_ENV])
    values = _read_file(source) if source is not None else ConfigFile()
    base = source.parent if source is not None else Path.cwd()

    def path(flag: Path | None, configured: str | None, default: Path) -> Path:
        if flag is not None:
            return _absolute(flag, Path.cwd())
        if configured is not None:
            return _absolute(Path(configured), base)
        return default

    library_path = path(flags.library_path, values.library_path, DEFAULT_LIBRARY_PATH)
    socket = path(flags.socket, values.socket, DEFAULT_SOCKET)
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            "socket",
            f"{socket} is {len(os.fsencode(socket))} bytes long; "
            f"a Unix socket path may have at most {MAX_SOCKET_PATH_BYTES}",
        )
    return Config(
        library_path=library_path,
        download_path=path(flags.download_path, values.download_path, library_path / "downloads"),
        socket=socket,
        resume_save_interval=values.resume_save_interval,
        shutdown_timeout=values.shutdown_timeout,
        min_free_bytes=values.min_free_bytes,
        stall_timeout=values.stall_timeout,
        libtorrent=dict(values.libtorrent),
        source=_absolute(source, Path.cwd()) if source is not None else None,
    )


def _read_file(source: Path) -> ConfigFile:
    try:
        text = source.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(source), f"cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(source), "the config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(source), f"not valid TOML: {exc}") from None
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    # A union reports its member type after the key (`socket.str`); the key alone says it.
    key = ".".join(loc[:2]) if loc[0] == "libtorrent" and len(loc) > 1 else loc[0]
    if first["type"] == "extra_forbidden":
        return ConfigError(key, "unknown key")
    if loc[0] == "libtorrent" and len(loc) > 1:
        return ConfigError(key, f"must be a string, an integer or a boolean, got {_shown(first)}")
    return ConfigError(key, f"{first['msg'][0].lower()}{first['msg'][1:]}, got {_shown(first)}")


def _shown(error: Any) -> str:
    value = error.get("input")
    return f"{value!r}" if not isinstance(value, dict) else "a table"


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path
