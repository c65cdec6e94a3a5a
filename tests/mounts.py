"""Real file systems for fault tests: a small tmpfs that fills, and loop-mounted images (ext4 for
power cuts, vfat and exFAT for the USB drive a user bought). Mounting needs root: tests that use
these are marked `needs_root`, skipped with that reason for an ordinary user (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root to mount a tmpfs or a loop device (CI runs as root)"
)

MKFS = {"ext4": "mkfs.ext4", "vfat": "mkfs.vfat", "exfat": "mkfs.exfat"}
# .ci/run installs these Debian packages when a mkfs is missing.
MKFS_PACKAGE = {"ext4": "e2fsprogs", "vfat": "dosfstools", "exfat": "exfatprogs"}


def mkfs_available(fstype: str) -> bool:
    return shutil.which(MKFS[fstype]) is not None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def make_image(image: Path, fstype: str, size_mib: int) -> None:
    """A file holding an empty `fstype` file system of `size_mib` MiB."""
    with image.open("wb") as file:
        file.truncate(size_mib << 20)
    quiet = {"ext4": ("-q", "-F"), "vfat": (), "exfat": ()}[fstype]
    _run(MKFS[fstype], *quiet, str(image))


def kernel_has(fstype: str) -> bool:
    """Whether the running kernel mounts `fstype` itself (this VM's has no vfat or exFAT)."""
    with Path("/proc/filesystems").open() as file:
        return any(line.split()[-1] == fstype for line in file if line.strip())


# Without the kernel's driver, the FUSE ones Debian has: fusefat (rw+ enables its writing) and
# exfat-fuse (on a loop device: it needs a block device).
FUSE_DRIVER = {"vfat": "fusefat", "exfat": "mount.exfat-fuse"}
FUSE_PACKAGE = {"vfat": "fusefat", "exfat": "exfat-fuse"}


def can_mount(fstype: str) -> bool:
    return mkfs_available(fstype) and (
        kernel_has(fstype) or shutil.which(FUSE_DRIVER.get(fstype, "-")) is not None
    )


def needs_filesystem(fstype: str) -> pytest.MarkDecorator:
    """Skips unless `fstype` can be made and mounted here (.ci/run installs what it needs)."""
    packages = [MKFS_PACKAGE[fstype], FUSE_PACKAGE.get(fstype, "")]
    return pytest.mark.skipif(
        not can_mount(fstype),
        reason=f"cannot make and mount {fstype} here: needs Debian's "
        f"{' and '.join(filter(None, packages))} (.ci/run installs them), or the kernel's driver",
    )


@contextlib.contextmanager
def loop_mounted(image: Path, mountpoint: Path, fstype: str, *options: str) -> Iterator[Path]:
    """`image` mounted on `mountpoint` (through a loop device), unmounted after (lazily, if
    busy). vfat and exFAT go through their FUSE drivers when the kernel has none."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    device: str | None = None
    if kernel_has(fstype):
        opts = ",".join(["loop", *options])
        _run("mount", "-t", fstype, "-o", opts, str(image), str(mountpoint))
    elif fstype == "vfat":
        _run("fusefat", "-o", ",".join(["rw+", *options]), str(image), str(mountpoint))
    elif fstype == "exfat":
        found = subprocess.run(
            ["losetup", "-f", "--show", str(image)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        device = found.stdout.strip()
        _run(
            "mount.exfat-fuse",
            *(("-o", ",".join(options)) if options else ()),
            device,
            str(mountpoint),
        )
    else:
        raise RuntimeError(f"cannot mount {fstype} here")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        if device is not None:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True, timeout=60)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (`"4m"`) on `mountpoint`, unmounted after: a disk that fills for real."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def unmount(mountpoint: Path) -> None:
    """Unmounts `mountpoint` if it is mounted; lazily when something still holds it open."""
    if not os.path.ismount(mountpoint):
        return
    result = subprocess.run(
        ["umount", str(mountpoint)], check=False, capture_output=True, timeout=60
    )
    if result.returncode != 0:
        _run("umount", "-l", str(mountpoint))


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Fills the file system of `folder` up to `leave_bytes` free, with one file (returned:
    delete it to give the space back)."""
    filler = folder / ".filler"
    with filler.open("wb") as file:
        chunk = b"\0" * (1 << 20)
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave_bytes:
                break
            try:
                file.write(chunk[: max(1, min(len(chunk), free - leave_bytes))])
                file.flush()
            except OSError:
                break
    return filler
