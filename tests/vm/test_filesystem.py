"""ext4 on a ublk device: mkfs, files with known checksums, fsck, daemon restart."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
from vmlib import MakeImage, ServeFactory, pattern

pytestmark = pytest.mark.every_kernel  # a filesystem through the kernel's block layer

MiB = 1 << 20


def _run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(argv)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _write_files(root: Path) -> dict[str, str]:
    rng = random.Random(20240601)
    sums: dict[str, str] = {}
    (root / "a" / "b").mkdir(parents=True)
    for i in range(24):
        size = rng.choice([0, 1, 511, 4096, 65536 + 17, 1 * MiB + 3, 3 * MiB])
        name = f"a/b/f{i}" if i % 3 else f"f{i}"
        data = pattern(i, size)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def _check_files(root: Path, sums: dict[str, str]) -> None:
    bad = [n for n, s in sums.items() if hashlib.sha256((root / n).read_bytes()).hexdigest() != s]
    assert not bad, f"{len(bad)} of {len(sums)} files differ: {bad}"


def test_ext4_survives_a_daemon_restart(make_image: MakeImage, serve: ServeFactory,
                                        scratch: Path) -> None:
    image = make_image(128 * MiB)
    mnt = scratch / "mnt"
    mnt.mkdir()
    dev = serve(image, "--queues", "2")
    _run("mkfs.ext4", "-q", "-F", dev.device)
    _run("mount", "-t", "ext4", dev.device, str(mnt))
    try:
        sums = _write_files(mnt)
        os.sync()
    finally:
        _run("umount", str(mnt))
    _run("fsck.ext4", "-fn", dev.device)
    dev.stop()

    again = serve(image, "--queues", "2")
    _run("mount", "-t", "ext4", again.device, str(mnt))
    try:
        _check_files(mnt, sums)
        # and the file system is still writable after the restart
        (mnt / "after").write_bytes(pattern(99, 2 * MiB))
    finally:
        _run("umount", str(mnt))
    _run("fsck.ext4", "-fn", again.device)
    again.stop()
