"""scripts/dlkeeper.service: systemd finds nothing wrong with it, it says what the daemon needs
(notify, watchdog, KillMode=mixed, the socket's folder, the sandbox), and the daemon really does
download inside that sandbox."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import exits
from supervisor.config import Config
from tests.daemons import DEADLINE, Daemon, write_config
from tests.swarm import seeding
from tests.torrents import make_payload

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).resolve().parent.parent / "scripts" / "dlkeeper.service"
MAX_EXPOSURE = 2.0  # `systemd-analyze security`: 1.3 now; Debian's transmission-daemon scores 9.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(
            "systemd-analyze is missing: install Debian's systemd package "
            "(`apt-get install systemd`; .ci/run does it)"
        )
    return found


def directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value given for it, in order (systemd keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, separator, value = line.partition("=")
        assert separator, f"not a key=value line in the unit: {raw!r}"
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def unit() -> dict[str, list[str]]:
    return directives(UNIT.read_text())


def one(key: str) -> str:
    (value,) = unit()[key]
    return value


def verify(unit_text: str) -> list[str]:
    """What `systemd-analyze verify` says about a unit named dlkeeper.service with this text:
    the lines that name it. Lines about other units on this host are not the unit's problem."""
    folder = Path(tempfile.mkdtemp(prefix="dkunit"))
    try:
        path = folder / "dlkeeper.service"
        path.write_text(unit_text)
        # --recursive-errors=no: the exit status then depends on this unit only, not on the
        # host's units it names (network-online.target); --man=no: no man pages to look up.
        result = subprocess.run(
            [systemd_analyze(), "verify", "--man=no", "--recursive-errors=no", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(folder)
    output = (result.stdout + result.stderr).splitlines()
    about_unit = [line for line in output if "dlkeeper.service" in line or str(folder) in line]
    if result.returncode != 0 and not about_unit:
        about_unit = [f"exit status {result.returncode}", *output]
    return about_unit


def with_real_exec_start(text: str) -> str:
    # `verify` checks that ExecStart's program exists. The shipped unit names the README's
    # install (/opt/dlkeeper); here the same command runs from this venv's dlkeeper instead.
    installed = Path(sys.executable).parent / "dlkeeper"
    assert installed.exists(), f"{installed} is missing: install the project into this venv"
    return text.replace("/opt/dlkeeper/bin/dlkeeper", str(installed))


def test_systemd_analyze_verify_finds_nothing_wrong_with_the_unit() -> None:
    assert verify(with_real_exec_start(UNIT.read_text())) == []


def test_the_verify_check_catches_a_misspelt_directive() -> None:
    # systemd only warns (exit status 0) about an unknown key: the check must read the output.
    text = with_real_exec_start(UNIT.read_text()).replace("ProtectSystem=", "ProtectSytem=")
    (problem,) = verify(text)
    assert "Unknown key" in problem
    assert "ProtectSytem" in problem


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Service.Type", "notify"),
        (
            "Service.ExecStart",
            "/opt/dlkeeper/bin/dlkeeper serve --config /etc/dlkeeper/dlkeeper.toml",
        ),
        ("Service.User", "dlkeeper"),
        ("Service.Group", "dlkeeper"),
        ("Service.Restart", "on-failure"),
        ("Service.KillMode", "mixed"),
        ("Service.RuntimeDirectory", "dlkeeper"),
        ("Service.UMask", "0007"),
        ("Service.NoNewPrivileges", "true"),
        ("Service.ProtectSystem", "strict"),
        ("Service.ProtectHome", "true"),
        ("Service.PrivateTmp", "true"),
        ("Service.PrivateDevices", "true"),
        ("Service.MemoryDenyWriteExecute", "true"),
        ("Service.CapabilityBoundingSet", ""),
        ("Install.WantedBy", "multi-user.target"),
    ],
)
def test_the_unit_sets(key: str, expected: str) -> None:
    assert one(key) == expected


def test_the_watchdog_is_on() -> None:
    assert int(one("Service.WatchdogSec")) > 0


def test_a_bad_config_or_a_held_lock_is_not_restarted_in_a_loop() -> None:
    assert set(one("Service.RestartPreventExitStatus").split()) == {"2", "3"}


def test_the_unit_waits_for_the_drives_and_retries_a_missing_one() -> None:
    # RequiresMountsFor= orders the start after the mounts of both folders; exit 4 (a folder
    # missing, its drive not mounted yet) is restarted, not given up on.
    mounts = [Path(path) for path in one("Unit.RequiresMountsFor").split()]
    defaults = Config()
    for needed in (defaults.library_path, defaults.download_path):
        assert needed in mounts, needed
    assert str(exits.STORAGE_MISSING) not in one("Service.RestartPreventExitStatus").split()


def test_the_address_families_are_unix_ip_and_netlink_only() -> None:
    families = set(one("Service.RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_system_calls_are_limited_to_a_system_services() -> None:
    assert unit()["Service.SystemCallFilter"][0] == "@system-service"


def test_the_default_socket_lies_in_the_runtime_directory() -> None:
    assert Config().socket.parent == Path("/run") / one("Service.RuntimeDirectory")


def test_the_sandbox_lets_the_daemon_write_its_default_state_and_download_folders() -> None:
    writable = [Path(path) for path in one("Service.ReadWritePaths").split()]
    defaults = Config()
    for needed in (defaults.layout.state_dir, defaults.download_path):
        assert any(needed.is_relative_to(path) for path in writable), needed


def test_systemd_waits_longer_for_a_stop_than_the_daemon_takes() -> None:
    # The daemon waits shutdown_timeout for resume data, then up to 10 s more for its actors.
    assert int(one("Service.TimeoutStopSec")) > Config().shutdown_timeout + 10


def test_the_exposure_score_stays_low() -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    found = re.search(r"Overall exposure level for dlkeeper\.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) < MAX_EXPOSURE, result.stdout


# What the unit's sandbox does to the daemon, with the kernel calls systemd makes for it, for
# `python -c SANDBOX READONLY WRITABLE... -- COMMAND...`: a private mount namespace where
# READONLY is read-only but for WRITABLE (ProtectSystem=strict + ReadWritePaths), an empty
# capability bounding set, NoNewPrivileges, and the kernel's own MemoryDenyWriteExecute.
# Not run as root, the mount namespace goes inside a user namespace of its own, where this
# user is root (as `unshare -Urm` does), since only a namespace's root may mount. The remount
# keeps the folder's nosuid, nodev and noexec, as systemd's does: inside a user namespace the
# kernel refuses to clear them (EPERM), and as root clearing them is no part of the sandbox.
SANDBOX = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), what)
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE = 24, 38, 65
split = sys.argv.index("--")
readonly, writable, command = sys.argv[1], sys.argv[2:split], sys.argv[split + 1:]
uid, gid = os.geteuid(), os.getegid()
if uid == 0:
    check(libc.unshare(CLONE_NEWNS), "unshare")
else:
    what = "unshare(CLONE_NEWUSER | CLONE_NEWNS): are unprivileged user namespaces allowed?"
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), what)
    maps = {"setgroups": "deny", "uid_map": f"0 {uid} 1", "gid_map": f"0 {gid} 1"}
    for name, line in maps.items():  # in this order: no gid_map before setgroups is denied
        with open("/proc/self/" + name, "w") as file:
            file.write(line)
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "private /")
check(libc.mount(readonly.encode(), readonly.encode(), None, MS_BIND | MS_REC, None), "bind")
for path in writable:
    check(libc.mount(path.encode(), path.encode(), None, MS_BIND, None), "bind " + path)
flags = MS_REMOUNT | MS_BIND | MS_RDONLY
flags |= os.statvfs(readonly).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
check(libc.mount(None, readonly.encode(), None, flags, None), "read-only")
for capability in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
    check(libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0), "drop capability")
check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")
check(libc.prctl(PR_SET_MDWE, 1, 0, 0, 0), "PR_SET_MDWE (Linux 6.3 or newer)")
os.execv(command[0], command)
"""


@pytest.fixture
def sandboxed(tmp_path: Path) -> Iterator[Daemon]:
    # The unit's /srv/media is this test's library; only its ReadWritePaths stay writable.
    library = tmp_path / "library"
    writable = []
    for path in one("Service.ReadWritePaths").split():
        inside = library / Path(path).relative_to(Config().library_path)
        inside.mkdir(parents=True)  # the install steps make them; systemd needs them to exist
        writable.append(inside)
    sandbox = [sys.executable, "-c", SANDBOX, str(library), *map(str, writable), "--"]
    daemon = Daemon(write_config(tmp_path / "etc", library), command_prefix=sandbox)
    try:
        yield daemon
    finally:
        daemon.close()


def test_a_download_completes_inside_the_units_sandbox(sandboxed: Daemon, tmp_path: Path) -> None:
    payload = make_payload(tmp_path / "seed", "Film", {"film.mkv": 1_500_000})
    with seeding(payload) as seeder:
        sandboxed.wait_ready()
        status = Path(f"/proc/{sandboxed.process.pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE), status
        assert re.search(r"^CapBnd:\s+0+$", status, re.MULTILINE), status
        library = str(tmp_path / "library")
        mounts = Path(f"/proc/{sandboxed.process.pid}/mountinfo").read_text().splitlines()
        (library_mount,) = [line for line in mounts if line.split()[4] == library]
        assert "ro" in library_mount.split()[5].split(","), library_mount
        with sandboxed.client() as client:
            client.call("subscribe")
            client.call("add", magnet=seeder.magnet(payload), task_id="film")
            completed = client.next_event("download.completed")
            data = (Path(completed["save_path"]) / "Film" / "film.mkv").read_bytes()
            assert hashlib.sha256(data).hexdigest() == payload.file_hashes["Film/film.mkv"]
            client.call("ack", task_id="film")
        sandboxed.process.send_signal(signal.SIGTERM)
        assert sandboxed.process.wait(DEADLINE) == 0, sandboxed.log.read_text()[-3000:]
