"""A daemon that dies (SIGKILL): its device stays, holding the guest's I/O, and
``serve IMAGE --recover DEVICE`` takes it over; the requests the dead daemon held are issued
again, so fio sees a stall and no error.  ``ublkmig stop`` removes a device nobody serves.
Bad takeovers are refused in one line, leaving the device as it was."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmlib import (
    FioLoop,
    MakeImage,
    Served,
    ServeFactory,
    Steps,
    assert_one_line_error,
    assert_same_bytes,
    device_status,
    pattern,
    read_device,
    run_cli,
    sha256_of,
    wait_gone,
)

MiB = 1 << 20
SIZE = 64 * MiB
BUSY = (8 * MiB, 32 * MiB)  # fio's loop
KILLS = 3  # daemons killed, one after another, in one run
FioLoopFactory = Callable[..., FioLoop]


def kill(served: Served) -> None:
    """SIGKILL: nothing of the daemon runs after it."""
    served.signal(signal.SIGKILL)
    served.wait()
    assert Path(served.device).is_block_device(), f"{served.device} went with its daemon"


@pytest.fixture
def orphans() -> Iterator[list[str]]:
    """Devices a test may leave without a daemon: removed at teardown."""
    left: list[str] = []
    yield left
    for device in left:
        if Path(device).exists() and device_alive(device) is False:
            run_cli("stop", device)


def device_alive(device: str) -> bool:
    with contextlib.suppress(Exception):
        device_status(device)
        return True
    return False


def test_daemon_killed_during_fio_verify(make_image: MakeImage, serve: ServeFactory,
                                         fio_loop: FioLoopFactory,
                                         orphans: list[str]) -> None:  # fmt: skip
    """fio writes and verifies all along; the daemon is killed with SIGKILL three times, each
    time while fio's requests are in flight, and a new one takes the device over: fio sees no
    error, the first 8 MiB keep their pattern, and the image ends equal to the device."""
    t = Steps("recover")
    data = pattern(21, BUSY[0])
    image = make_image(SIZE, data=data)
    dev = serve(image, "--queues", "2")
    orphans.append(dev.device)
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("serve, first fio job")
    for n in range(KILLS):
        before = busy.written
        deadline = time.monotonic() + 60
        while busy.written == before or device_status(dev.device)["stats"]["inflight"] == 0:
            assert time.monotonic() < deadline, "fio sent nothing for a minute"
            time.sleep(0.05)
        kill(dev)
        time.sleep(0.5)  # the guest's I/O waits meanwhile
        again = serve(image, "--recover", dev.device)
        assert again.device == dev.device, (again.device, dev.device)
        err = again.stderr()
        assert "event=device.recovering" in err and "event=device.recovered" in err, err
        dev = again
        written = busy.written
        busy.wait_runs(busy.runs + 1)
        assert busy.written > written
        t(f"killed and recovered ({n + 1}), a fio job after")
    busy.mark()
    busy.stop()
    busy.verify()
    assert device_status(dev.device)["stats"]["errors"] == 0
    assert read_device(dev.device, 0, BUSY[0]) == data, "the pattern changed"
    digest = assert_same_bytes(dev.device, image, SIZE)
    t("fio verify, compare")
    dev.stop()
    assert sha256_of(image) == digest, "the image differs from what the device showed"


def test_stop_removes_a_device_whose_daemon_died(make_image: MakeImage, serve: ServeFactory,
                                                  orphans: list[str]) -> None:  # fmt: skip
    image = make_image(SIZE)
    dev = serve(image)
    orphans.append(dev.device)
    kill(dev)
    r = run_cli("stop", dev.device)
    assert r.returncode == 0, r.stderr
    assert "removed " + dev.device in r.stdout, r.stdout
    wait_gone(dev.device)
    r = run_cli("stop", dev.device)
    assert assert_one_line_error(r, "stop, twice") == (
        f"ublkmig: error: no ublkmig daemon serves {dev.device}")


def test_bad_takeovers_one_line_each(make_image: MakeImage, serve: ServeFactory,
                                     orphans: list[str]) -> None:  # fmt: skip
    image = make_image(SIZE, data=pattern(22, MiB))
    other = make_image(SIZE // 2, name="other.img")
    dev = serve(image)
    orphans.append(dev.device)

    r = run_cli("serve", str(other), "--recover", dev.device)
    line = assert_one_line_error(r, "recover a live device")
    assert line.startswith(f"ublkmig: error: cannot recover {dev.device}: {dev.device} is "
                           "served by a live process"), line
    assert device_status(dev.device)["stats"]["errors"] == 0

    kill(dev)
    r = run_cli("serve", str(other), "--recover", dev.device)
    line = assert_one_line_error(r, "recover with an image of another size")
    assert "holds 33554432 bytes but" in line and "not the image it served" in line, line
    r = run_cli("serve", str(image), "--recover", "/dev/ublkb999")
    line = assert_one_line_error(r, "recover a device that does not exist")
    assert line.startswith(
        "ublkmig: error: cannot recover /dev/ublkb999: there is no ublk device 999"), line

    # refused takeovers leave it recoverable
    again = serve(image, "--recover", dev.device)
    assert read_device(again.device, 0, MiB) == pattern(22, MiB)
    again.stop()
