"""--read-only: the kernel sees a read-only disk; writes fail; the image stays as it was."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess

import pytest
from vmlib import MakeImage, ServeFactory, device_info, pattern, read_device

pytestmark = pytest.mark.every_kernel  # the kernel's read-only device

MiB = 1 << 20
SIZE = 8 * MiB
REFUSED = {errno.EROFS, errno.EPERM, errno.EACCES, errno.EIO}


def test_read_only_refuses_writes(make_image: MakeImage, serve: ServeFactory) -> None:
    data = pattern(3, SIZE)
    image = make_image(SIZE, data=data)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    dev = serve(image, "--read-only")
    ro = subprocess.run(["blockdev", "--getro", dev.device], capture_output=True, text=True)
    assert ro.stdout.strip() == "1", f"blockdev --getro: {ro.stdout} {ro.stderr}"
    assert read_device(dev.device, MiB, MiB) == data[MiB:2 * MiB]

    # a buffered and a direct write, each refused at open, write or fsync
    for direct in (False, True):
        err = _write_errno(dev.device, direct)
        assert err is not None, f"a write to read-only {dev.device} worked (direct={direct})"
        assert err in REFUSED, f"direct={direct}: {errno.errorcode.get(err, err)}"
    for argv in (["dd", "if=/dev/zero", f"of={dev.device}", "bs=4k", "count=1", "oflag=direct"],
                 ["blkdiscard", "-o", "0", "-l", str(MiB), dev.device],
                 ["blkdiscard", "-z", "-o", "0", "-l", str(MiB), dev.device]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, f"{' '.join(argv)} worked on a read-only device"
    stats = device_info(dev.device)["stats"]
    assert stats["writes"] == 0 and stats["discards"] == 0 and stats["write_zeroes"] == 0, stats
    dev.stop()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "the image changed"


def _write_errno(device: str, direct: bool) -> int | None:
    """errno of the first step of open/pwrite/fsync that failed, None if all worked."""
    buf = mmap.mmap(-1, 4096)  # page aligned, for O_DIRECT
    try:
        fd = os.open(device, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    except OSError as e:
        return e.errno
    try:
        os.pwritev(fd, [buf], 0)
        os.fsync(fd)
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
        buf.close()
    return None
