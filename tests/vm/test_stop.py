"""Stopping a daemon while I/O is in flight: no hang, a clean exit, a consistent image."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from vmlib import (
    MakeImage,
    ServeFactory,
    device_info,
    pattern,
    read_device,
    run_fio,
    write_device,
)

MiB = 1 << 20
SIZE = 64 * MiB
KNOWN = 8 * MiB           # [0, 8 MiB): a pattern written directly, fsynced
VERIFIED = (8 * MiB, 16 * MiB)  # [8, 24 MiB): written and verified by fio
BUSY = (24 * MiB, 40 * MiB)     # [24, 64 MiB): hammered while the daemon stops
FIO_EXIT = 60.0  # fio must notice the device going away within this


def _verified_job() -> dict[str, Any]:
    return dict(name="verified", rw="randwrite", bsrange="4k-64k", iodepth=32,
                ioengine="io_uring", direct=1, verify="crc32c", verify_fatal=1,
                offset=VERIFIED[0], size=VERIFIED[1], randseed=42)


# SIGINT takes the same path as SIGTERM (one signal handler): SIGTERM and the CLI's stop
@pytest.mark.parametrize("how", [pytest.param("SIGTERM", marks=pytest.mark.every_kernel), "cli"])
def test_stop_with_io_in_flight(how: str, make_image: MakeImage, serve: ServeFactory,
                                scratch: Path) -> None:
    image = make_image(SIZE)
    dev = serve(image, "--queues", "2", "--depth", "32")
    known = pattern(11, KNOWN)
    write_device(dev.device, 0, known)
    run_fio(dev.device, cwd=scratch, **_verified_job())

    # fio on the busy range, in the background, for far longer than the test
    log = scratch / "busy.out"
    with open(log, "wb") as out:
        busy = subprocess.Popen(
            ["fio", "--name=busy", f"--filename={dev.device}", "--rw=randrw", "--bs=4k-128k",
             "--iodepth=32", "--ioengine=io_uring", "--direct=1", "--numjobs=2",
             f"--offset={BUSY[0]}", f"--size={BUSY[1]}", "--time_based", "--runtime=600",
             "--verify_state_save=0", "--group_reporting"],
            stdout=out, stderr=subprocess.STDOUT, cwd=scratch)
    try:
        _wait_for_io(dev.device, busy)
        t0 = time.monotonic()
        dev.stop(how)  # exit status 0, device nodes gone
        stop_s = time.monotonic() - t0
        try:
            busy.wait(FIO_EXIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"fio still runs {FIO_EXIT:.0f} s after the daemon stopped ({how}): hung I/O?\n"
                f"{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        if busy.poll() is None:
            busy.kill()
            busy.wait()
    print(f"stop ({how}) with fio running took {stop_s:.1f} s; fio exited {busy.returncode}")

    # the image is consistent: serve it again and check what was durable before the stop
    again = serve(image, "--queues", "2")
    assert read_device(again.device, 0, KNOWN) == known, "the fsynced pattern changed"
    run_fio(again.device, cwd=scratch, verify_only=1, **_verified_job())
    run_fio(again.device, cwd=scratch, name="readall", rw="read", bs="1M", iodepth=8,
            ioengine="io_uring", direct=1, size=SIZE)
    assert device_info(again.device)["stats"]["errors"] == 0
    again.stop()


def _wait_for_io(device: str, busy: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the daemon has served a good number of the background fio's requests."""
    first = device_info(device)["stats"]
    base = first["reads"] + first["writes"]
    deadline = time.monotonic() + timeout
    while True:
        assert busy.poll() is None, f"the background fio exited {busy.returncode} early"
        s = device_info(device)["stats"]
        if s["reads"] + s["writes"] - base > 200:
            return
        assert time.monotonic() < deadline, f"no I/O reached the daemon in {timeout:.0f} s: {s}"
        time.sleep(0.5)

