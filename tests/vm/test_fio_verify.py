"""fio with crc32c verification over real ublk devices: every data path, both queue
counts' worth of CPUs, mixed block sizes, 512 and 4096-byte logical blocks, --direct.

Sizes are modest: under TCG emulation each test should take well under a minute.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vmlib import MakeImage, ServeFactory, data_paths, device_info

pytestmark = pytest.mark.every_kernel  # the data path (copy mode on 6.12, zero copy on the newest)

MiB = 1 << 20
SIZE = 64 * MiB
Fio = Callable[..., dict[str, Any]]
BSSPLIT = "4k/35:8k/15:16k/15:32k/10:64k/15:128k/10"


def _check(report: dict[str, Any], *, wrote: int) -> None:
    jobs = report["jobs"]
    written = sum(j["write"]["io_bytes"] for j in jobs)
    read = sum(j["read"]["io_bytes"] for j in jobs)
    assert written >= wrote, f"fio wrote {written} bytes, expected >= {wrote}"
    assert read >= wrote, f"fio verified {read} bytes, expected >= {wrote}"


def _no_errors(device: str) -> None:
    stats = device_info(device)["stats"]
    assert stats["errors"] == 0, stats
    assert stats["writes"] > 0 and stats["reads"] > 0, stats


@pytest.mark.parametrize("path", data_paths())
def test_random_mixed_sizes_verify(path: str, make_image: MakeImage, serve: ServeFactory,
                                   fio: Fio) -> None:
    """Two fio jobs (one per vCPU, so both queues see I/O), random writes of mixed sizes
    at depth 32 each through io_uring, then a crc32c read-back."""
    dev = serve(make_image(SIZE), "--queues", "2", "--depth", "64", "--data-path", path)
    info = device_info(dev.device)
    assert info["data_path"] == path and info["queues"] == 2, info
    report = fio(dev.device, rw="randwrite", bssplit=BSSPLIT, iodepth=32, ioengine="io_uring",
                 direct=1, verify="crc32c", verify_fatal=1, numjobs=2, size=SIZE // 2,
                 offset_increment=SIZE // 2, group_reporting=False)
    _check(report, wrote=SIZE)
    _no_errors(dev.device)
    dev.stop()


def test_sequential_bsrange_verify_survives_a_restart(make_image: MakeImage,
                                                      serve: ServeFactory, fio: Fio) -> None:
    """Sequential writes of 4k-256k through libaio at depth 32, verified; then the daemon
    restarts and fio verifies the same data again (verify_only)."""
    image = make_image(SIZE)
    job: dict[str, Any] = dict(rw="write", bsrange="4k-256k", iodepth=32, ioengine="libaio",
                               direct=1, verify="crc32c", verify_fatal=1, size=SIZE,
                               randseed=1234)
    dev = serve(image, "--queues", "2")
    _check(fio(dev.device, **job), wrote=SIZE)
    _no_errors(dev.device)
    dev.stop()
    again = serve(image, "--queues", "2")
    report = fio(again.device, verify_only=1, **job)
    assert sum(j["read"]["io_bytes"] for j in report["jobs"]) >= SIZE, report["jobs"]
    again.stop()


def test_4k_logical_blocks(make_image: MakeImage, serve: ServeFactory, fio: Fio,
                           scratch: Path) -> None:
    dev = serve(make_image(SIZE), "--logical-block-size", "4096", "--queues", "2")
    name = Path(dev.device).name
    assert Path(f"/sys/block/{name}/queue/logical_block_size").read_text().strip() == "4096"
    report = fio(dev.device, rw="randwrite", bsrange="4k-64k", blockalign="4k", iodepth=32,
                 ioengine="io_uring", direct=1, verify="crc32c", verify_fatal=1, size=SIZE)
    _check(report, wrote=SIZE)
    # a 512-byte direct write is below the logical block size: the kernel refuses it
    r = subprocess.run(["dd", "if=/dev/zero", f"of={dev.device}", "bs=512", "count=1",
                        "oflag=direct"], capture_output=True, text=True, cwd=scratch)
    assert r.returncode != 0, "a 512-byte O_DIRECT write to a 4096-byte-block device worked"
    _no_errors(dev.device)
    dev.stop()


def test_direct_backend(make_image: MakeImage, serve: ServeFactory, fio: Fio) -> None:
    """--direct: the image is opened with O_DIRECT (tmpfs has it since Linux 6.6)."""
    dev = serve(make_image(SIZE), "--direct", "--queues", "2")
    assert device_info(dev.device)["direct"] is True
    report = fio(dev.device, rw="randrw", rwmixread=30, bssplit=BSSPLIT, iodepth=32,
                 ioengine="libaio", direct=1, verify="crc32c", verify_fatal=1, size=SIZE,
                 do_verify=1)
    assert report["jobs"][0]["write"]["io_bytes"] > 0
    _no_errors(dev.device)
    dev.stop()


def test_buffered_io_through_the_page_cache(make_image: MakeImage, serve: ServeFactory,
                                            fio: Fio) -> None:
    """Not every user does O_DIRECT: buffered writes, fsync at the end, verified."""
    dev = serve(make_image(32 * MiB))
    report = fio(dev.device, rw="randwrite", bssplit=BSSPLIT, ioengine="psync", direct=0,
                 end_fsync=1, verify="crc32c", verify_fatal=1, size=32 * MiB)
    _check(report, wrote=32 * MiB)
    dev.stop()


