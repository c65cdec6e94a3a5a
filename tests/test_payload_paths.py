"""A payload never lands among dlkeeper's own files (issue 10, item 7): neither a save_path inside
`{download_path}/torrents` nor a torrent whose files would be written there (a multi-file torrent
named `torrents` saved at download_path) is accepted; both are `path_not_allowed`.

Needs the change to supervisor/api.py proposed with it (`_save_path`, `_refuse_own_folders`):
until it lands these tests fail, except the one that checks such a name elsewhere is accepted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.metainfo import bencode
from tests.api import (
    Served,
    b64,
    code_of,
    fixture_api,  # noqa: F401 (a fixture)
    fixture_shared,  # noqa: F401 (a fixture)
    new_id,
)
from tests.daemons import RawClient, running_daemon, write_config
from tests.test_hostile_input import v1_torrent

pytestmark = pytest.mark.timeout(60)


def single_file_torrent(name: bytes) -> bytes:
    info = {b"name": name, b"piece length": 16384, b"length": 5, b"pieces": b"\1" * 20}
    return bencode({b"info": info})


def assert_refused(served: Served, client: RawClient, torrent: bytes, **params: str) -> None:
    task_id = new_id("refused")
    reply = client.request("add", torrent_b64=b64(torrent), task_id=task_id, **params)
    assert code_of(reply) == "path_not_allowed", reply
    assert "dlkeeper keeps its own files" in reply["error"]["message"]
    assert task_id not in served.library.state()
    assert not served.library.layout.torrent_path(task_id).exists()


@pytest.mark.parametrize(
    "save_path", ["torrents", "torrents/sub", "{downloads}/torrents", "{downloads}/torrents/x"]
)
def test_a_save_path_inside_the_folder_of_torrent_copies_is_not_allowed(
    shared: Served, api: RawClient, save_path: str
) -> None:
    torrent = v1_torrent(new_id("payload").encode(), [[b"a.bin"]])
    requested = save_path.format(downloads=shared.library.downloads)
    assert_refused(shared, api, torrent, save_path=requested)


def test_a_save_path_linking_into_the_folder_of_torrent_copies_is_not_allowed(
    shared: Served, api: RawClient
) -> None:
    link = shared.library.downloads / new_id("link")
    link.symlink_to(shared.library.torrents, target_is_directory=True)
    torrent = v1_torrent(new_id("payload").encode(), [[b"a.bin"]])
    assert_refused(shared, api, torrent, save_path=str(link))


@pytest.mark.parametrize(
    "name",
    [b"torrents", b"/torrents", "tor\u200brents".encode()],  # what libtorrent makes "torrents"
    ids=["plain", "leading-slash", "zero-width-space"],
)
def test_a_multi_file_torrent_named_torrents_at_download_path_is_not_allowed(
    shared: Served, api: RawClient, name: bytes
) -> None:
    # Its files would be torrents/<anything>, <other task>.fastresume included.
    torrent = v1_torrent(name, [[new_id("file").encode() + b".fastresume"]])
    assert_refused(shared, api, torrent)


def test_a_single_file_torrent_named_torrents_at_download_path_is_not_allowed(
    shared: Served, api: RawClient
) -> None:
    assert_refused(shared, api, single_file_torrent(b"torrents"))


def test_a_torrent_named_torrents_in_a_folder_of_download_path_is_accepted(
    shared: Served, api: RawClient
) -> None:
    torrent = v1_torrent(b"torrents", [[new_id("file").encode()]])
    task_id = new_id("allowed")
    api.call("add", torrent_b64=b64(torrent), task_id=task_id, save_path="movies", paused=True)
    assert shared.library.state()[task_id]["save_path"] == str(shared.library.downloads / "movies")


def test_a_torrent_that_would_write_into_the_state_folder_is_not_allowed(tmp_path: Path) -> None:
    # download_path = library_path: a torrent named "data" would write beside downloads.json.
    library = tmp_path / "library"
    library.mkdir()
    config = write_config(tmp_path / "etc", library, download_path=str(library))
    with running_daemon(config) as daemon, daemon.client() as client:
        torrent = v1_torrent(b"data", [[b"downloads.json"]])
        reply = client.request("add", torrent_b64=b64(torrent), task_id="into-state")
        assert code_of(reply) == "path_not_allowed", reply


# --- not item 7, but the same file's change: a refused add keeps no .torrent copy ---------------


def test_an_add_refused_by_the_state_file_keeps_no_torrent_copy(
    shared: Served, api: RawClient
) -> None:
    # The copy is written before the record is saved; a refusal from persistence other than
    # duplicate (bad_request for a value the state file cannot hold) left it behind, nobody's.
    deep: dict[str, object] = {}
    for _ in range(300):
        deep = {"a": deep}
    task_id = new_id("deep")
    torrent = v1_torrent(new_id("payload").encode(), [[b"a.bin"]])
    reply = api.request("add", torrent_b64=b64(torrent), task_id=task_id, torrent_metadata=deep)
    assert code_of(reply) == "bad_request", reply
    assert not shared.library.layout.torrent_path(task_id).exists()
