"""A slow local disk, for the tests and the benchmark: device-mapper's delay target over a
loop device on a file.

``delayed_disk(file, write_delay_ms)`` attaches ``file`` to a loop device and puts a
dm-delay device over it whose writes (and flushes) each wait ``write_delay_ms``, while
reads go straight through; it yields ``/dev/mapper/NAME`` and tears both down on exit.
Needs root, dmsetup and the dm-delay module.  Writes only wait when they reach the device:
open it with O_DIRECT (the daemon does when it serves its image with ``--direct``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DmDelayError(RuntimeError):
    pass


def _run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise DmDelayError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip()


@contextmanager
def delayed_disk(file: Path, write_delay_ms: int, name: str | None = None) -> Iterator[Path]:
    """``/dev/mapper/NAME``: ``file`` behind a loop device, each write delayed."""
    name = name or f"ublkmig-slow-{os.getpid()}"
    size = file.stat().st_size
    if size % 512:
        raise DmDelayError(f"{file}: {size} bytes is not a whole number of sectors")
    _run("modprobe", "loop")
    _run("modprobe", "dm-delay")
    loop = _run("losetup", "--find", "--show", str(file))
    try:
        # <device> <offset> <read delay> then <write device> <offset> <write delay>
        # (flushes take the write delay); no udev in the VM: dmsetup makes the node
        table = f"0 {size // 512} delay {loop} 0 0 {loop} 0 {write_delay_ms}"
        _run("dmsetup", "create", name, "--noudevsync", "--table", table)
        try:
            _run("dmsetup", "mknodes", name)
            yield Path("/dev/mapper") / name
        finally:
            _remove(name)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)


def _remove(name: str) -> None:
    """``dmsetup remove``, retried while something still holds the device."""
    for _ in range(50):
        r = subprocess.run(["dmsetup", "remove", "--noudevsync", name], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise DmDelayError(f"dmsetup remove {name} failed: {r.stderr.strip()}")
