"""Download records for tests."""

from __future__ import annotations

from datetime import UTC, datetime

from actors.state import DownloadRecord, DownloadStatus


def make_record(
    task_id: str,
    status: DownloadStatus = DownloadStatus.DOWNLOADING,
    *,
    info_hash: str | None = None,
    progress: float = 0.0,
) -> DownloadRecord:
    """A valid magnet download; the info hash is derived from the task_id unless given."""
    digest = info_hash or (task_id.encode().hex() * 40)[:40]
    return DownloadRecord(
        task_id=task_id,
        name=f"Movie {task_id}",
        info_hash=digest,
        created_at=datetime(2026, 11, 24, 22, 0, tzinfo=UTC),
        status=status,
        magnet_link=f"magnet:?xt=urn:btih:{digest}&dn={task_id}",
        save_path="/srv/media/downloads",
        file_priorities=(1, 0),
        torrent_metadata={"title": f"Movie {task_id}", "year": 1999},
        validation_metadata={"size_hint": 123},
        progress=progress,
    )
