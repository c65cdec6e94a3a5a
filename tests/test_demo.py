"""`dlkeeper demo` end to end: the real demo as a child process, with its seeder, its daemons and
their libtorrent workers. Every process it starts carries a marker in its environment, so the
tests can tell that none is left behind, however it ends."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

MARKER = "DLKEEPER_DEMO_TEST_MARKER"
DEMO = [sys.executable, "-m", "supervisor.demo"]
FILE_SIZE_LIMIT = 4 * 1024 * 1024  # bytes: room for logs and state, not for the payload


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment holds `MARKER=marker` (zombies have none)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environment.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    """A marker for the demo's environment; whatever carries it is killed at the end."""
    value = uuid.uuid4().hex
    yield value
    for pid in marked_processes(value):
        os.kill(pid, signal.SIGKILL)


def demo_env(marker: str, **extra: str) -> dict[str, str]:
    return {**os.environ, MARKER: marker, "PYTHONUNBUFFERED": "1", **extra}


def folder_of(stdout: str) -> Path:
    """The demo's folder, from its `  in FOLDER` line."""
    for line in stdout.splitlines():
        if line.startswith("  in "):
            return Path(line.removeprefix("  in "))
    raise AssertionError(f"the demo named no folder:\n{stdout}")


@pytest.mark.timeout(60)
def test_demo_proves_the_resume_after_sigkill_and_keeps_its_folder(marker: str) -> None:
    result = subprocess.run(
        [*DEMO, "--keep"],
        check=False,
        capture_output=True,
        text=True,
        env=demo_env(marker),
        timeout=55,
    )
    folder = folder_of(result.stdout)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert not marked_processes(marker)
        lines = result.stdout.splitlines()
        for expected in (
            "What this proved:",
            "  re-check after restart        none",
            "  files with the right SHA-256  3 of 3",
            "  completion acked              yes; files kept",
        ):
            assert expected in lines, result.stdout
        assert any(line.startswith("  progress at the SIGKILL") for line in lines)
        assert lines[-1].startswith("✓ all checks passed in ")
        assert f"Kept the demo folder: {folder}" in lines
        # What was kept is what the demo talks about: its logs, the resume data as the kill left
        # it, and the downloaded files, which the ack did not remove.
        downloaded = folder / "library" / "downloads" / "Big Buck Demo (2026)"
        for kept in (
            folder / "daemon-1.log",
            folder / "daemon-2.log",
            folder / "at-kill.fastresume",
            downloaded / "Big Buck Demo (2026).mkv",
            downloaded / "Extras" / "Making of.mkv",
        ):
            assert kept.is_file(), kept
        assert "stopped cleanly" in (folder / "daemon-2.log").read_text()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(60)
def test_interrupted_demo_stops_every_process_and_removes_its_folder(marker: str) -> None:
    demo = subprocess.Popen(
        DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=demo_env(marker)
    )
    try:
        assert demo.stdout is not None
        seen = []
        # Interrupted mid-download: the seeder, a daemon and its worker are running.
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("✓ added task"):
                break
        else:
            raise AssertionError(f"the demo ended before the download started:\n{seen}")
        assert len(marked_processes(marker)) >= 3
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
    finally:
        demo.kill()
        demo.wait()
    assert demo.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        "✗ interrupted; every process the demo started is stopped"
    ]
    assert not marked_processes(marker)
    assert not folder_of("".join(seen)).exists()


def limit_file_size() -> None:
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@pytest.mark.timeout(30)
def test_demo_whose_payload_cannot_be_written_fails_in_one_line_and_cleans_up(
    marker: str,
) -> None:
    result = subprocess.run(
        DEMO,
        check=False,
        capture_output=True,
        text=True,
        env=demo_env(marker),
        preexec_fn=limit_file_size,
        timeout=25,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    [reason] = result.stderr.splitlines()
    assert reason.startswith("✗ the seeder failed: "), reason
    assert "File too large" in reason
    assert reason.endswith("(run with --keep to read the logs)")
    assert not marked_processes(marker)
    assert not folder_of(result.stdout).exists()
