"""Configuration: defaults, relative paths, DLKEEPER_CONFIG, flags over file, every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import ConfigError
from supervisor.config import DEFAULT_SOCKET, PathFlags, load_config


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "dlkeeper.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_apply_without_a_config_file() -> None:
    config = load_config(PathFlags(), environ={})
    assert config.library_path == Path("/srv/media")
    assert config.download_path == Path("/srv/media/downloads")
    assert config.socket == DEFAULT_SOCKET
    assert config.resume_save_interval == 60
    assert config.shutdown_timeout == 5
    assert dict(config.libtorrent) == {}
    assert config.source is None


def test_every_key_is_read_from_the_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
library_path = "/srv/lib"
download_path = "/srv/dl"
socket = "/run/x.sock"
resume_save_interval = 15
shutdown_timeout = 2.5

[libtorrent]
listen_interfaces = "127.0.0.1:0"
enable_dht = false
connections_limit = 50
""",
    )
    config = load_config(PathFlags(config=path), environ={})
    assert config.library_path == Path("/srv/lib")
    assert config.download_path == Path("/srv/dl")
    assert config.socket == Path("/run/x.sock")
    assert config.resume_save_interval == 15
    assert config.shutdown_timeout == 2.5
    assert dict(config.libtorrent) == {
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": False,
        "connections_limit": 50,
    }
    assert config.source == path


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'library_path = "lib"\nsocket = "../run/api.sock"\n')
    config = load_config(PathFlags(config=path), environ={})
    assert config.library_path == tmp_path / "etc" / "lib"
    assert config.download_path == tmp_path / "etc" / "lib" / "downloads"
    assert config.socket == tmp_path / "etc" / ".." / "run" / "api.sock"


def test_download_path_defaults_to_the_library_paths_downloads_folder(tmp_path: Path) -> None:
    config = load_config(PathFlags(library_path=tmp_path / "media"), environ={})
    assert config.download_path == tmp_path / "media" / "downloads"


def test_dlkeeper_config_names_the_file_when_no_flag_does(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'library_path = "/from/env"\n')
    config = load_config(PathFlags(), environ={"DLKEEPER_CONFIG": str(path)})
    assert config.library_path == Path("/from/env")


def test_config_flag_wins_over_dlkeeper_config(tmp_path: Path) -> None:
    from_env = write_config(tmp_path, 'library_path = "/from/env"\n')
    from_flag = tmp_path / "flag.toml"
    from_flag.write_text('library_path = "/from/flag"\n')
    config = load_config(PathFlags(config=from_flag), environ={"DLKEEPER_CONFIG": str(from_env)})
    assert config.library_path == Path("/from/flag")


def test_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_config(
        tmp_path, 'library_path = "/file/lib"\ndownload_path = "/file/dl"\nsocket = "/file.sock"\n'
    )
    flags = PathFlags(
        config=path,
        library_path=Path("/flag/lib"),
        download_path=Path("relative/dl"),
        socket=Path("/flag.sock"),
    )
    config = load_config(flags, environ={})
    assert config.library_path == Path("/flag/lib")
    assert config.download_path == tmp_path / "relative" / "dl"  # a flag is relative to the cwd
    assert config.socket == Path("/flag.sock")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('resume_save_interval = "60"', "resume_save_interval", "valid number"),
        ("resume_save_interval = true", "resume_save_interval", "valid number"),
        ("resume_save_interval = -1", "resume_save_interval", "greater than 0"),
        ("resume_save_interval = 0", "resume_save_interval", "greater than 0"),
        ("shutdown_timeout = -0.5", "shutdown_timeout", "greater than 0"),
        ("shutdown_timeout = inf", "shutdown_timeout", "finite"),
        ("socket = 5", "socket", "valid string"),
        ('library_path = ""', "library_path", "at least 1 character"),
        ("download_path = [1]", "download_path", "valid string"),
        ("bogus = 1", "bogus", "unknown key"),
        ("libtorrent = 3", "libtorrent", "valid dictionary"),
        ("[libtorrent]\nlisten_interfaces = [1]", "libtorrent.listen_interfaces", "string"),
        ("[libtorrent]\nfoo = 1.5", "libtorrent.foo", "integer or a boolean"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_key(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(PathFlags(config=path), environ={})
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert "\n" not in str(caught.value)


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "library_path = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(PathFlags(config=path), environ={})
    assert caught.value.key == str(path)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read the config file") as caught:
        load_config(PathFlags(), environ={"DLKEEPER_CONFIG": str(missing)})
    assert caught.value.key == str(missing)


def test_an_unreadable_config_file_is_an_error(tmp_path: Path) -> None:
    # A folder cannot be read as a file, even by root (chmod 000 would not stop root).
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(PathFlags(config=tmp_path), environ={})


def test_a_config_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'library_path = "/srv/m\xe9dia"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(PathFlags(config=path), environ={})


def test_a_socket_path_too_long_for_a_unix_socket_is_an_error_naming_the_key(
    tmp_path: Path,
) -> None:
    long_socket = tmp_path / ("s" * 120) / "api.sock"
    with pytest.raises(ConfigError) as caught:
        load_config(PathFlags(socket=long_socket), environ={})
    assert caught.value.key == "socket"
    assert "at most 107" in str(caught.value)
