"""Migrations that do not complete: cancelled midway, or a destination that fails midway
(out of space; a device that starts returning I/O errors).  Each time fio keeps writing and
verifying without an error, the device goes on serving from the source, and the source
holds exactly what the device shows (compared byte for byte)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import assert_one_line_error, run_cli
from support.images import sparse_image
from vmlib import (
    FioLoop,
    MakeImage,
    ServeFactory,
    Steps,
    WriteProbe,
    assert_same_bytes,
    check_completed,
    cli_status,
    device_status,
    finish_migrate,
    pattern,
    read_device,
    run_ok,
    sha256_of,
    start_migrate,
    wait_migrate,
    wait_migration,
)

from ublkmig.bench.dm_delay import delayed_disk
from ublkmig.bench.nbd_server import NbdServer

MiB = 1 << 20
SIZE = 64 * MiB
DATA = 48 * MiB  # [0, DATA) holds a pattern; the rest is a hole
BUSY = (16 * MiB, 16 * MiB)  # (offset, length): fio's loop, inside the pattern
FioLoopFactory = Callable[..., FioLoop]
NbdServerFactory = Callable[..., NbdServer]


def _check_source_serves(dev_device: str, image: Path, busy: FioLoop, data: bytes) -> str:
    """After a migration that did not complete: the device serves the source, unharmed."""
    st = device_status(dev_device)
    assert st["image"] == str(image), f"the device serves {st['image']}, not {image}"
    assert st["stats"]["errors"] == 0, st["stats"]
    busy.verify()
    assert read_device(dev_device, 0, BUSY[0]) == data[:BUSY[0]], "the pattern changed"
    assert read_device(dev_device, sum(BUSY), DATA - sum(BUSY)) == data[sum(BUSY):DATA]
    return assert_same_bytes(dev_device, image, SIZE)


# mirror (mirrored writes to undo) and snapshot (deltas to fold back); dbt's cancel is
# mirror's without them
@pytest.mark.parametrize("mode", ["mirror", "snapshot"])
def test_cancel_midway(mode: str, make_image: MakeImage, serve: ServeFactory,
                       fio_loop: FioLoopFactory, scratch: Path) -> None:
    t = Steps(f"cancel-{mode}")
    data = pattern(3, DATA)
    image = make_image(SIZE, data=data)
    dest = scratch / "dest.img"
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("serve, first fio job")

    # 1M (48 s for the data): the status polls and the cancel (a Python start each, seconds
    # under TCG, 10 s and more on a slow day) must come while it is midway; at 4M a snapshot
    # migration cut over before the cancel came, on a day the VM ran at a third of its speed
    r = run_cli("migrate", dev.device, "--to", str(dest), "--mode", mode, "--speed", "1M")
    assert r.returncode == 0, r
    mig = wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] // 8,
                         timeout=60, what="an eighth copied")
    assert mig["chunks_copied"] < mig["chunks"], f"copied already, too fast to cancel: {mig}"
    t("migration started")
    r = run_cli("cancel", dev.device)
    assert r.returncode == 0, f"cancel failed: {r.stdout}\n{r.stderr}"
    assert f"cancelled: {dev.device} keeps serving {image}" in r.stdout, r.stdout
    t("cancelled")
    busy.mark()
    busy.stop()  # writes after the cancel too
    mig = cli_status(dev.device)["migration"]  # status --json, as a user sees it
    assert mig["phase"] == "cancelled" and mig["error"] is None, mig
    assert not dest.exists(), "the destination the migration created is still there"

    digest = _check_source_serves(dev.device, image, busy, data)
    t("verify, compare")
    dev.stop()
    assert sha256_of(image) == digest, "the source differs from what the device showed"


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    run_ok("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def dm_device(scratch: Path, size: int, name: str) -> Iterator[Path]:
    """A device-mapper device (linear over a loop device over a file on /dev/shm) whose
    table ``dm_fail(name)`` replaces with the ``error`` target."""
    backing = scratch / "dm-backing.img"
    sparse_image(backing, size)
    subprocess.run(["modprobe", "-a", "loop", "dm_mod"], capture_output=True)
    loop = run_ok("losetup", "--find", "--show", str(backing)).strip()
    try:
        run_ok("dmsetup", "create", name, "--noudevsync", "--table",
               f"0 {size // 512} linear {loop} 0")
        try:
            kname = run_ok("dmsetup", "info", "-c", "--noheadings", "-o", "blkdevname",
                           name).strip()
            node = Path("/dev") / kname
            deadline = time.monotonic() + 10
            while not node.is_block_device():
                assert time.monotonic() < deadline, f"{node} did not appear"
                time.sleep(0.05)
            yield node
        finally:
            _dm_remove(name)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def _dm_remove(name: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        r = subprocess.run(["dmsetup", "remove", "--noudevsync", name], capture_output=True,
                           text=True)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            info = subprocess.run(["dmsetup", "info", name], capture_output=True, text=True)
            holders = subprocess.run(["sh", "-c", "ls -l /proc/[0-9]*/fd 2>/dev/null | "
                                      "grep -B0 dm- ; ls /sys/block/dm-*/holders"],
                                     capture_output=True, text=True)
            raise AssertionError(f"dmsetup remove {name} failed: {r.stderr}\n{info.stdout}\n"
                                 f"{holders.stdout}")
        time.sleep(0.2)


def dm_fail(name: str, size: int) -> None:
    """From now on every I/O to the device fails (EIO)."""
    run_ok("dmsetup", "suspend", "--noudevsync", name)
    try:
        run_ok("dmsetup", "load", name, "--table", f"0 {size // 512} error")
    finally:
        run_ok("dmsetup", "resume", "--noudevsync", name)


def _failed(r: subprocess.CompletedProcess[str], dev_device: str, image: Path, why: str,
            busy: FioLoop) -> None:
    """``migrate --wait`` said the migration failed for ``why``; the guest writes (stopped
    here, after one more fio job) saw no error; status says the same."""
    line = assert_one_line_error(r, "migrate --wait to a failing destination")
    assert f"the migration of {dev_device} failed" in line, line
    assert why in line and f"it keeps serving {image}" in line, line
    busy.mark()
    busy.stop()
    mig = device_status(dev_device)["migration"]
    assert mig["phase"] == "failed" and why in mig["error"], mig


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f} s"
        time.sleep(0.1)


def tmpfs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def dm_open_count(name: str) -> int:
    return int(run_ok("dmsetup", "info", "-c", "--noheadings", "-o", "open", name).strip())


def test_destination_out_of_space(make_image: MakeImage, serve: ServeFactory,
                                  fio_loop: FioLoopFactory, scratch: Path) -> None:
    """Mirror mode to a DEST on a tmpfs of 16 MiB: the copy of 48 MiB of data, and the
    guest writes mirrored to it, run out of space.  Then the device migrates to a
    destination with room."""
    t = Steps("enospc-mirror")
    data = pattern(4, DATA)
    image = make_image(SIZE, data=data)
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("serve, first fio job")
    with small_tmpfs(scratch / "small", "16M") as small:
        dest = small / "dest.img"
        r = wait_migrate(start_migrate(dev.device, dest, "--mode", "mirror", "--speed", "24M"))
        t("migration")
        _failed(r, dev.device, image, "No space left on device (ENOSPC)", busy)
        assert not dest.exists(), "the destination the migration created is still there"
        # and its space is free again while the device serves on (before Linux 6.13
        # that needs the destination out of the queues' fixed-file tables)
        wait_until(lambda: tmpfs_used(small) < MiB, "the destination's space freed")
        digest = _check_source_serves(dev.device, image, busy, data)
        t("verify, compare")
        # the device can still migrate, to a destination with room
        good = scratch / "good.img"
        finish_migrate(start_migrate(dev.device, good))
        assert_same_bytes(dev.device, good, SIZE)
        dev.stop()
        assert tmpfs_used(small) < MiB, "the failed destination's space is still in use"
    assert sha256_of(good) == digest, "DEST differs from what the device showed"
    t("migrate again, compare")


# mirror (the guest's writes meet the failure) and snapshot (deltas to fold back)
@pytest.mark.parametrize("mode", ["mirror", "snapshot"])
def test_destination_starts_failing(mode: str, make_image: MakeImage, serve: ServeFactory,
                                    fio_loop: FioLoopFactory, scratch: Path) -> None:
    """DEST a device-mapper device whose table turns into ``error`` midway.  The copier's
    writes go through the destination's page cache, so the failure shows when they are
    written back or, at the latest, when the destination is flushed before the cutover."""
    t = Steps(f"eio-{mode}")
    data = pattern(6, DATA)
    image = make_image(SIZE, data=data)
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, *BUSY)
    name = f"ubm-dest-{os.getpid()}-{mode}"
    with dm_device(scratch, SIZE, name) as dest:
        busy.wait_runs(1)
        t("dm device, serve, first fio job")
        proc = start_migrate(dev.device, dest, "--mode", mode, "--speed", "8M")
        wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] // 4,
                       timeout=60, what="a quarter copied")
        dm_fail(name, SIZE)
        t("copied a quarter, then the destination fails")
        r = wait_migrate(proc)
        t("migration")
        _failed(r, dev.device, image, "Input/output error", busy)
        # the daemon let go of the destination's exclusive claim ...
        os.close(os.open(dest, os.O_RDONLY | os.O_EXCL))
        # ... and of the destination itself
        wait_until(lambda: dm_open_count(name) == 0, "the destination closed")
        digest = _check_source_serves(dev.device, image, busy, data)
        t("verify, compare")
        dev.stop()
        assert dm_open_count(name) == 0, "the destination is still open"
    assert sha256_of(image) == digest, "the source differs from what the device showed"


def test_snapshot_without_room_for_deltas(serve: ServeFactory, fio_loop: FioLoopFactory,
                                          scratch: Path) -> None:
    """The source on a tmpfs with less room left than the disk's size: snapshot mode's
    deltas (copy-on-write of whole chunks, kept to the end) cannot all fit.  The guest
    must see no error: the writes that found no room wait while the migration fails and
    folds the deltas back into the source, then go there; the device ends as the source,
    byte for byte, and the deltas' room is free again."""
    t = Steps("snapshot-no-room")
    with small_tmpfs(scratch / "small", "96M") as small:
        image = small / "disk.img"
        data = pattern(12, SIZE)
        image.write_bytes(data)  # 64 MiB: 32 MiB left for deltas
        dest = scratch / "dest.img"
        dev = serve(image)
        busy = fio_loop(dev.device, 0, SIZE)  # every chunk of the disk
        busy.wait_runs(1)
        t("serve, first fio job")
        r = wait_migrate(start_migrate(dev.device, dest, "--mode", "snapshot", "--speed",
                                       "16M"))
        t("migration")
        busy.mark()
        busy.stop()  # raises FioFailed if a guest write failed
        busy.verify()
        st = device_status(dev.device)
        assert st["stats"]["errors"] == 0, st["stats"]
        # the deltas fill the tmpfs long before the copy ends (16 MiB/s): the migration
        # fails, and the writes since its start went back into the source
        assert r.returncode != 0, "the migration succeeded with no room for its deltas"
        assert "snapshot delta" in r.stderr and "ENOSPC" in r.stderr, r.stderr
        assert st["image"] == str(image), (st["image"], r)
        assert tmpfs_used(small) < SIZE + 4 * MiB, "the deltas' room is still in use"
        digest = assert_same_bytes(dev.device, image, SIZE)
        dev.stop()
        assert sha256_of(image) == digest


def test_auto_mode_falls_back_from_a_slow_nbd_destination(
        make_image: MakeImage, nbd_server: NbdServerFactory, serve: ServeFactory,
        fio_loop: FioLoopFactory) -> None:  # fmt: skip
    """DEST an nbdkit export whose every write waits 30 ms (delay filter), over a unix
    socket; auto mode (the default).  Mirrored writes wait for it past the threshold, so the
    migration falls back to dirty tracking, and mirrors again to converge: no pause, no
    guest error, DEST holds what the device shows."""
    t = Steps("auto-slow-nbd")
    data = pattern(8, DATA)
    image = make_image(SIZE, data=data)
    server = nbd_server("nbdkit-file", "unix", SIZE, extra=["--filter=delay"],
                        params=["delay-write=30ms"])  # fmt: skip
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("server, serve, first fio job")
    # (the copier held to 4 MiB/s: the loop's writes are mirrored for seconds, whatever the
    # loop's timing, so the sampler sees them wait)
    proc = start_migrate(dev.device, server.uri, "--speed", "4M")
    finish_migrate(proc)
    t("migration")
    mig = check_completed(dev.device, server.uri, "auto")
    assert mig["fallbacks"] >= 1 and mig["mirror_returns"] == mig["fallbacks"], mig
    assert mig["writes"] == "mirrored", mig  # (it ends mirroring)
    busy.mark()
    busy.stop()
    busy.verify()
    assert server.file is not None
    digest = assert_same_bytes(dev.device, server.file, SIZE)
    t("fio verify, compare")
    dev.stop()
    assert sha256_of(server.file) == digest, "DEST differs from what the device showed"


SLOW_MS = 40  # dm-delay: every write to the slow local destination waits this long


def _migrate_to_slow_local_disk(mode: str, make_image: MakeImage, serve: ServeFactory,
                                fio_loop: FioLoopFactory, scratch: Path) -> dict[str, Any]:
    """One migration to a dm-delay device (a loop device on tmpfs, writes delayed SLOW_MS),
    the image served with --direct (so the destination is opened O_DIRECT and every write
    reaches dm-delay), fio's verify loop busy throughout and a probe timing one 4 KiB write
    every 20 ms.  Returns the probe's median write latency before and during the migration
    (seconds) and the migration's counters."""
    t = Steps(f"slow-local-{mode}")
    data = pattern(8, DATA)
    image = make_image(SIZE, name=f"{mode}.img", data=data)
    backing = scratch / f"{mode}-slow.img"
    sparse_image(backing, SIZE)
    with delayed_disk(backing, SLOW_MS, name=f"ublkmig-test-slow-{mode}") as slow:
        dev = serve(image, "--queues", "2", "--direct")
        busy = fio_loop(dev.device, *BUSY)
        busy.wait_runs(1)
        probe = WriteProbe(dev.device, SIZE - 4096)  # (in the hole: nothing else writes it)
        probe.start()
        time.sleep(2)
        t("dm-delay, serve, first fio job, 2 s of probing")
        start = time.monotonic()
        proc = start_migrate(dev.device, slow, "--mode", mode, "--speed", "4M")
        finish_migrate(proc)
        t("migration")
        mig = check_completed(dev.device, slow, mode)
        lat = {"before": probe.median(start - 2, start),
               "during": probe.median(start, start + mig["cutover_after"])}  # fmt: skip
        probe.stop()
        busy.mark()
        busy.stop()
        busy.verify()
        digest = assert_same_bytes(dev.device, slow, SIZE)
        assert device_status(dev.device)["stats"]["errors"] == 0
        t("fio verify, compare")
        dev.stop()
    assert sha256_of(backing) == digest, "DEST differs from what the device showed"
    return {**lat, "seconds": mig["cutover_after"], "fallbacks": mig["fallbacks"],
            "mirror_returns": mig["mirror_returns"], "writes": mig["writes"]}  # fmt: skip


def test_auto_mode_falls_back_from_a_slow_local_disk(
        make_image: MakeImage, serve: ServeFactory, fio_loop: FioLoopFactory,
        scratch: Path) -> None:  # fmt: skip
    """A slow local destination (dm-delay, writes 40 ms): auto mode falls back to dirty
    tracking, so the guest's writes stay close to their latency before the migration, and
    it still converges (mirroring at the end, no pause), DEST equal to the device byte for
    byte and fio verify clean.  (Mirror mode beside it, whose writes wait for the disk, is
    the benchmark's slow scenario: `ublkmig bench --scenario slow`, on IOPS and p99.)"""
    auto = _migrate_to_slow_local_disk("auto", make_image, serve, fio_loop, scratch)
    print(f"guest 4 KiB write, median, auto mode: before / during the migration: "
          f"{auto['before'] * 1e3:.1f} / {auto['during'] * 1e3:.1f} ms "
          f"({auto['seconds']:.1f} s, {auto['fallbacks']} fallbacks)", flush=True)
    # it fell back, mirrored again to converge, and the guest mostly did not wait
    assert auto["fallbacks"] >= 1 and auto["mirror_returns"] == auto["fallbacks"], auto
    assert auto["writes"] == "mirrored", auto
    assert auto["during"] < SLOW_MS / 2e3, auto


def test_nbd_server_that_stops_answering(make_image: MakeImage, nbd_server: NbdServerFactory,
                                         serve: ServeFactory, fio_loop: FioLoopFactory) -> None:
    """DEST an export of qemu-nbd over TCP, stopped (SIGSTOP: its socket takes requests and
    nothing answers, as behind a silent partition) a quarter into a mirror migration with
    ``--dest-timeout 2``.  A mirrored guest write waits for it at most that long; then the
    connections count as lost, the writes complete from the source, their chunks go dirty,
    and each dial again times out in the handshake.  fio never sees an error, ``cancel``
    returns within the timeout, and the source holds what the device shows.  (nbdkit's delay
    filter would do, but nbdkit 1.32 aborts when a client closes a connection whose delayed
    write it is answering.)"""
    t = Steps("nbd-silent")
    data = pattern(9, DATA)
    image = make_image(SIZE, data=data)
    server = nbd_server("qemu-nbd", "tcp", SIZE)
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("server, serve, first fio job")
    r = run_cli("migrate", dev.device, "--to", server.uri, "--mode", "mirror", "--speed", "8M",
                "--dest-timeout", "2")  # fmt: skip
    assert r.returncode == 0, f"migrate failed: {r.stdout}\n{r.stderr}"
    wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] // 4,
                   timeout=60, what="a quarter copied")
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        mig = wait_migration(dev.device, lambda m: m["phase"] == "reconnecting", timeout=60,
                             what="the silent destination given up")
        assert mig["dest_down"] >= 1, mig
        lost = [line for line in dev.stderr().splitlines() if "destination_lost" in line]
        assert lost and all("timed out" in line for line in lost), dev.stderr()
        t("stopped the server; its connections timed out")
        busy.wait_runs(busy.runs + 1)  # a whole fio job while the destination is silent
        t("a fio job meanwhile")
        t0 = time.monotonic()
        r = run_cli("cancel", dev.device)
        took = time.monotonic() - t0
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert r.returncode == 0, f"cancel failed: {r.stdout}\n{r.stderr}"
    # the timeout (2 s) of a dial in progress, plus a Python start or two under emulation
    assert took < 20, f"cancel took {took:.1f} s with a --dest-timeout of 2 s"
    t(f"cancelled in {took:.1f} s")
    busy.mark()
    busy.stop()
    mig = device_status(dev.device)["migration"]
    assert mig["phase"] == "cancelled", mig
    digest = _check_source_serves(dev.device, image, busy, data)
    t("verify, compare")
    dev.stop()
    assert sha256_of(image) == digest, "the source differs from what the device showed"


def test_nbd_destination_answers_errors(make_image: MakeImage, nbd_server: NbdServerFactory,
                                        serve: ServeFactory, fio_loop: FioLoopFactory,
                                        scratch: Path) -> None:  # fmt: skip
    """DEST an nbdkit export that answers every write with EIO (error filter) once a file
    appears, a quarter into a mirror migration: the migration fails at once with that error,
    the guest's writes complete from the source, and the source holds what the device shows."""
    t = Steps("nbd-eio")
    data = pattern(10, DATA)
    image = make_image(SIZE, data=data)
    trigger = scratch / "fail-writes"
    server = nbd_server("nbdkit-file", "tcp", SIZE, extra=["--filter=error"],
                        params=["error-pwrite=EIO", "error-pwrite-rate=100%",
                                f"error-pwrite-file={trigger}"])  # fmt: skip
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("server, serve, first fio job")
    proc = start_migrate(dev.device, server.uri, "--mode", "mirror", "--speed", "8M")
    wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] // 4,
                   timeout=60, what="a quarter copied")
    trigger.touch()
    t("copied a quarter, then the destination fails")
    r = wait_migrate(proc)
    t("migration")
    _failed(r, dev.device, image, "Input/output error", busy)
    assert device_status(dev.device)["migration"]["dest_errors"] >= 1
    digest = _check_source_serves(dev.device, image, busy, data)
    t("verify, compare")
    dev.stop()
    assert sha256_of(image) == digest, "the source differs from what the device showed"
