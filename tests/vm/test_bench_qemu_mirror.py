"""The benchmark's QEMU peer (ublkmig.bench.qemu_mirror): qemu-storage-daemon serves a
disk over NBD to the kernel's NBD client, fio writes to /dev/nbdN with crc32c
verification while QEMU's blockdev-mirror moves the disk, in both copy modes.  Afterwards
fio verifies the device, and the destination file equals the device byte for byte.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from vmlib import FioLoop, Steps, assert_same_bytes, sha256_of

from ublkmig.bench.qemu_mirror import CopyMode, QemuMirrorPeer

MiB = 1 << 20
SIZE = 16 * MiB  # (at 64 MiB, stopping fio took 68 of the test's 95 s: each job writes it all)

pytestmark = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v qemu-storage-daemon && command -v nbd-client"],
                   capture_output=True).returncode != 0,
    reason="needs qemu-storage-daemon (qemu-system-common) and nbd-client (nbd-client)")


class Fio4kLoop(FioLoop):
    """vmlib's fio loop with 4k random writes only (two jobs, one per half)."""

    def job(self, seed: int) -> dict[str, Any]:
        half = self.length // 2
        return dict(name=f"loop{seed}", rw="randwrite", bs="4k", iodepth=16,
                    ioengine="io_uring", direct=1, verify="crc32c", verify_fatal=1,
                    verify_backlog=64, numjobs=2, offset=self.offset, size=half,
                    offset_increment=half, randseed=seed, group_reporting=False,
                    **self.extra)


def test_modprobe_nbd() -> None:
    r = subprocess.run(["modprobe", "nbd"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"modprobe nbd: {r.stderr}"
    assert Path("/sys/module/nbd").is_dir()
    deadline = time.monotonic() + 10
    while not Path("/dev/nbd0").is_block_device():
        assert time.monotonic() < deadline, "/dev/nbd0 did not appear after modprobe nbd"
        time.sleep(0.05)


# write-blocking: the bench's peer of ublkmig's mirror mode (the bench runs both copy modes)
@pytest.mark.parametrize("copy_mode", ["write-blocking"])
def test_mirror_under_fio(copy_mode: CopyMode, scratch: Path) -> None:
    t = Steps(f"qemu-mirror-{copy_mode}")
    image, dest = scratch / "src.img", scratch / "dst.img"
    with open("/dev/urandom", "rb") as rnd, open(image, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(rnd.read(MiB))
    with QemuMirrorPeer(image, scratch / "qsd") as peer:
        assert peer.device is not None
        t(f"qsd up, {peer.device} attached")
        queues = list(Path(f"/sys/block/{Path(peer.device).name}/mq").iterdir())
        assert len(queues) == peer.connections == 2, queues
        assert_same_bytes(image, peer.device, SIZE)
        loop = Fio4kLoop(peer.device, 0, SIZE, cwd=scratch)
        loop.start()
        try:
            time.sleep(3)  # fio is writing (a job takes longer than this)
            assert loop.is_alive() and loop.error is None, loop.error
            t("fio started")
            res = peer.mirror(dest, copy_mode)
            t(f"mirror: {res.elapsed:.1f} s, ready after {res.ready_after} s,"
              f" cutover {res.cutover} s, progress {res.offset}/{res.length}")
            print("timeline:", [(round(tm - res.timeline[0][0], 3), name)
                                for tm, name in res.timeline])
            assert loop.is_alive() and loop.error is None, loop.error  # fio kept writing
            # and writes after completion too: they must reach the destination only
            loop.mark()
            loop.stop()
        finally:
            loop.halt()
        t(f"fio stopped after {loop.runs} jobs, {loop.written >> 20} MiB written")
        assert res.error is None, res.error
        events = [name for _, name in res.timeline]
        assert "BLOCK_JOB_READY" in events and "BLOCK_JOB_COMPLETED" in events, events
        assert res.ready_after is not None and 0 < res.ready_after <= res.elapsed
        assert res.offset == res.length >= SIZE, (res.offset, res.length)
        assert peer.export_node() == res.node != "src", "the export did not pivot"
        loop.verify()
        t("fio verify")
        digest = assert_same_bytes(dest, peer.device, SIZE)
        # the jobs after completion went to the destination, not to the old source
        assert sha256_of(image) != digest, "the source has the destination's data"
        t("destination == device")
