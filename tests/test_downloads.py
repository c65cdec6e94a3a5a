"""DownloadInfo from a saved record and libtorrent's live status."""

from __future__ import annotations

from actors.downloads import download_info
from actors.messages.worker import TorrentStatus
from actors.state import DownloadStatus
from tests.records import make_record


def live(task_id: str, **changes: object) -> TorrentStatus:
    values: dict[str, object] = {
        "task_id": task_id,
        "info_hash": "ab" * 20,
        "name": "Movie",
        "state": "downloading",
        "paused": False,
        "auto_managed": True,
        "finished": False,
        "has_metadata": False,
        "progress": 0.5,
        "total_bytes": 1000,
        "downloaded_bytes": 500,
        "download_rate": 70_000,
        "upload_rate": 9_000,
        "num_peers": 3,
        "error": None,
        "files": (),
    }
    return TorrentStatus.model_validate({**values, **changes})


def test_a_downloading_download_shows_libtorrents_rates_and_peers() -> None:
    info = download_info(make_record("d"), live("d"))
    assert (info.download_rate, info.upload_rate, info.num_peers) == (70_000, 9_000, 3)


def test_a_paused_download_shows_no_rate_and_no_peers_while_libtorrents_averages_fade() -> None:
    record = make_record("p", DownloadStatus.PAUSED)
    info = download_info(record, live("p", paused=True, auto_managed=False))
    assert info.status == "paused"
    assert (info.download_rate, info.upload_rate, info.num_peers) == (0, 0, 0)


def test_a_completed_download_downloads_nothing_but_may_still_upload() -> None:
    record = make_record("c", DownloadStatus.COMPLETED)
    info = download_info(record, live("c", state="seeding", finished=True))
    assert info.status == "completed"
    assert info.download_rate == 0
    assert (info.upload_rate, info.num_peers) == (9_000, 3)


def test_after_a_restart_a_queued_download_shows_its_saved_progress_not_libtorrents_zero() -> None:
    record = make_record("q", DownloadStatus.DOWNLOADING, progress=0.4)
    info = download_info(record, live("q", paused=True, progress=0.0, download_rate=0))
    assert info.status == "queued"
    assert info.progress == 0.4
