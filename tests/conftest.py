"""Shared fixtures: the anyio backend, and state stores in temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.state import MigrationContext
from actors.statefile import StateStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty `{library_path}/data` folder."""
    directory = tmp_path / "library" / "data"
    directory.mkdir(parents=True)
    return directory


@pytest.fixture
def store(state_dir: Path, tmp_path: Path) -> StateStore:
    """A `StateStore` on `state_dir`, not yet locked."""
    return StateStore(state_dir, MigrationContext(download_path=tmp_path / "downloads"))
