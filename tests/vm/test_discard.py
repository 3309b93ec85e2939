"""Discard and write-zeroes read back as zeros, and leave every other byte alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from vmlib import MakeImage, ServeFactory, drop_caches, pattern, read_device

pytestmark = pytest.mark.every_kernel  # the kernel's discard and write-zeroes requests

MiB = 1 << 20
SIZE = 16 * MiB
ZERO = bytes(MiB)


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"


@pytest.mark.parametrize("lbs", ["512", "4096"])
def test_discard_and_write_zeroes_read_as_zeros(lbs: str, make_image: MakeImage,
                                                serve: ServeFactory) -> None:
    data = pattern(7, SIZE)
    image = make_image(SIZE, data=data)
    dev = serve(image, "--logical-block-size", lbs)
    sysq = Path(f"/sys/block/{Path(dev.device).name}/queue")
    assert int((sysq / "discard_max_bytes").read_text()) > 0, "the device offers no discard"
    assert int((sysq / "write_zeroes_max_bytes").read_text()) > 0, "no write-zeroes"

    zeroed = {  # MiB index -> how
        1: "blkdiscard", 2: "blkdiscard", 5: "blkdiscard -z", 9: "fallocate -z",
        12: "fallocate -p",
    }
    _run("blkdiscard", "-o", str(1 * MiB), "-l", str(2 * MiB), dev.device)
    _run("blkdiscard", "-z", "-o", str(5 * MiB), "-l", str(MiB), dev.device)
    _run("fallocate", "-z", "-o", str(9 * MiB), "-l", str(MiB), dev.device)
    _run("fallocate", "-p", "-o", str(12 * MiB), "-l", str(MiB), dev.device)
    # a partial discard, 64 KiB inside MiB 14 (discard granularity permitting)
    _run("blkdiscard", "-z", "-o", str(14 * MiB + 65536), "-l", "65536", dev.device)
    drop_caches(dev.device)

    def expected(i: int) -> bytes:
        if i in zeroed:
            return ZERO
        chunk = data[i * MiB:(i + 1) * MiB]
        if i == 14:
            chunk = chunk[:65536] + bytes(65536) + chunk[131072:]
        return chunk

    for i in range(SIZE // MiB):
        got = read_device(dev.device, i * MiB, MiB)
        assert got == expected(i), f"MiB {i} ({zeroed.get(i, 'untouched')}) is wrong"
    dev.stop()
    on_disk = image.read_bytes()
    for i in range(SIZE // MiB):
        assert on_disk[i * MiB:(i + 1) * MiB] == expected(i), f"image MiB {i} is wrong"
