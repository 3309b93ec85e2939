"""A daemon that dies (SIGKILL): its device stays, holding the guest's I/O, and
``serve IMAGE --recover DEVICE`` takes it over; the requests the dead daemon held are issued
again, so fio sees a stall and no error.  ``ublkmig stop`` removes a device nobody serves.
Bad takeovers are refused in one line, leaving the device as it was."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cli import UBLKMIG, assert_one_line_error, run_cli
from support.images import sparse_image
from vmlib import (
    FioLoop,
    MakeImage,
    Served,
    ServeFactory,
    Steps,
    assert_same_bytes,
    check_completed,
    cli_status,
    device_status,
    finish_migrate,
    pattern,
    read_device,
    sha256_of,
    start_migrate,
    wait_gone,
    wait_migrate,
    wait_migration,
    write_device,
)

from ublkmig import control, state
from ublkmig.bench.nbd_server import NbdServer

MiB = 1 << 20
SIZE = 64 * MiB
BUSY = (8 * MiB, 16 * MiB)  # fio's loop (each job writes and reads all of it: its time)
KILLS = 3  # daemons killed, one after another, in one run
FioLoopFactory = Callable[..., FioLoop]
NbdServerFactory = Callable[..., NbdServer]


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


@pytest.mark.every_kernel
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


@pytest.mark.every_kernel
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
    assert line.startswith(f"ublkmig: error: {dev.device} is served by a live ublkmig daemon "
                           f"(pid {dev.proc.pid})"), line
    assert device_status(dev.device)["stats"]["errors"] == 0

    kill(dev)
    r = run_cli("serve", str(other), "--recover", dev.device)
    line = assert_one_line_error(r, "recover with another image")
    assert line == f"ublkmig: error: {dev.device} was serving {image}: recover it with that image"
    # without the state its daemon left (one that could not write it) nothing is concluded:
    # refused unless --force, and then the size still tells
    state.device_path(dev.dev_id).unlink()
    r = run_cli("serve", str(other), "--recover", dev.device)
    line = assert_one_line_error(r, "recover without a record")
    assert line.startswith(f"ublkmig: error: no record of what {dev.device} served"), line
    r = run_cli("serve", str(other), "--recover", dev.device, "--force")
    line = assert_one_line_error(r, "recover with an image of another size")
    assert "holds 33554432 bytes but" in line and "not the image it served" in line, line
    r = run_cli("serve", str(image), "--recover", "/dev/ublkb999")
    line = assert_one_line_error(r, "recover a device that does not exist")
    assert line.startswith(
        "ublkmig: error: cannot recover /dev/ublkb999: there is no ublk device 999"), line

    # refused takeovers leave it recoverable (with --force: its record is gone)
    again = serve(image, "--recover", dev.device, "--force")
    assert read_device(again.device, 0, MiB) == pattern(22, MiB)
    again.stop()


# ---- with a migration running ---------------------------------------------------------------


def start_resume(device: str) -> subprocess.Popen[str]:
    """``ublkmig migrate DEVICE --resume --wait`` in the background."""
    return subprocess.Popen([*UBLKMIG, "migrate", device, "--resume", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def kill_mid_migration(dev: Served, proc: subprocess.Popen[str], share: float) -> None:
    """Once ``share`` of the chunks are copied, SIGKILL the daemon; its ``migrate --wait``
    then fails (the daemon is gone)."""
    wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] * share,
                   timeout=120, what=f"{share:.0%} copied")  # fmt: skip
    kill(dev)
    r = wait_migrate(proc)
    assert r.returncode != 0, r.stdout


# mirror, on every kernel (a takeover mid-migration is the kernel's part), and snapshot (the
# takeover folds the deltas back first); the policy resumes dbt and auto as mirror (host
# tests: the saved options), and the soak, ci/soak, kills each
@pytest.mark.parametrize("mode", [pytest.param("mirror", marks=pytest.mark.every_kernel),
                                  "snapshot"])
def test_daemon_killed_mid_migration_then_resumed(
        mode: str, make_image: MakeImage, serve: ServeFactory, fio_loop: FioLoopFactory,
        scratch: Path, orphans: list[str]) -> None:  # fmt: skip
    """fio writes and verifies all along.  The daemon dies (SIGKILL) a third into the
    migration; a new one takes the device over and serves the source; `migrate --resume`
    goes on to the same destination, comparing what it already holds.  The resumed one is
    killed too, and resumed again: it completes, fio verify passes, and the destination
    holds, byte for byte, what the device shows."""
    t = Steps(f"resume-{mode}")
    data = pattern(23, SIZE - MiB)
    image = make_image(SIZE, data=data)
    dest = scratch / "dest.img"
    dev = serve(image, "--queues", "2")
    orphans.append(dev.device)
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("serve, first fio job")
    proc = start_migrate(dev.device, dest, "--mode", mode, "--speed", "8M")
    kill_mid_migration(dev, proc, 1 / 3)
    t("killed a third into the migration")
    for n, share in enumerate((2 / 3, None)):
        dev = serve(image, "--recover", dev.device)
        st = cli_status(dev.device)
        assert st["image"] == str(image) and st["migration"] is None, st
        interrupted = st["interrupted"]
        assert interrupted is not None and interrupted["dest"] == str(dest), st
        assert interrupted["mode"] == mode and interrupted["reach"] > 0, interrupted
        assert "event=migration.interrupted" in dev.stderr(), dev.stderr()
        if mode == "snapshot":  # the guest's writes were in the deltas: folded back first
            assert "event=snapshot.folded_back" in dev.stderr(), dev.stderr()
            assert not list(scratch.glob("*.ublkmig-delta*")), list(scratch.glob("*"))
        proc = start_resume(dev.device)
        if share is not None:
            kill_mid_migration(dev, proc, share)
            t(f"recovered, resumed, killed again ({n + 1})")
    finish_migrate(proc)
    t("recovered, resumed to the end")
    mig = check_completed(dev.device, dest, mode)
    assert mig["resumed"] is True and mig["bytes_matched"] > 0, mig
    busy.mark()
    busy.stop()
    busy.verify()
    digest = assert_same_bytes(dev.device, dest, SIZE)
    t("fio verify, compare")
    dev.stop()
    assert sha256_of(dest) == digest, "DEST differs from what the device showed"


def test_recover_after_a_completed_migration_needs_the_destination(
        make_image: MakeImage, serve: ServeFactory, scratch: Path,
        orphans: list[str]) -> None:  # fmt: skip
    data = pattern(24, 4 * MiB)
    image = make_image(SIZE, data=data)
    dest = scratch / "moved.img"
    sparse_image(dest, SIZE + 8 * MiB)  # larger than the device (allowed), so recovered as such
    dev = serve(image)
    orphans.append(dev.device)
    finish_migrate(start_migrate(dev.device, dest))
    write_device(dev.device, 4 * MiB, pattern(25, MiB))  # on the destination only
    kill(dev)
    r = run_cli("serve", str(image), "--recover", dev.device)
    line = assert_one_line_error(r, "recover with the migrated-from image")
    assert line == (f"ublkmig: error: {dev.device} was serving {dest}: recover it with that "
                    "image"), line
    again = serve(dest, "--recover", dev.device)
    assert read_device(again.device, 0, 5 * MiB) == data + pattern(25, MiB)
    assert cli_status(again.device)["interrupted"] is None
    again.stop()
    # a reboot loses /run with the device; the record that the old image is not the disk
    # any more is elsewhere (persistent), so serving it is refused
    shutil.rmtree(control.run_dir(), ignore_errors=True)
    r = run_cli("serve", str(image))
    line = assert_one_line_error(r, "serve the migrated-from image")
    assert line == (f"ublkmig: error: {image} is not the disk any more: {dev.device} migrated to "
                    f"{dest}, which holds every write since; serve that (or pass --force to "
                    "serve this old copy)"), line


def test_recover_refuses_after_a_snapshot_migration_lost_its_layer_map(
        make_image: MakeImage, serve: ServeFactory, scratch: Path,
        orphans: list[str]) -> None:  # fmt: skip
    """Snapshot mode keeps the guest's writes in deltas beside the image, and where they are
    in a layer map (IMAGE.ublkmig-delta.map).  Without the map, serving the image again would
    silently lose them: the takeover is refused; `stop` removes the device."""
    image = make_image(SIZE, data=pattern(26, MiB))
    dev = serve(image)
    orphans.append(dev.device)
    proc = start_migrate(dev.device, scratch / "snap.img", "--mode", "snapshot", "--speed", "4M")
    wait_migration(dev.device, lambda m: m["phase"] == "copying", timeout=60, what="copying")
    write_device(dev.device, 0, pattern(27, MiB))  # into the delta
    kill(dev)
    wait_migrate(proc)
    layer_map = Path(f"{image}.ublkmig-delta.map")
    assert layer_map.exists() and Path(f"{image}.ublkmig-delta.1").exists()
    layer_map.unlink()
    r = run_cli("serve", str(image), "--recover", dev.device)
    line = assert_one_line_error(r, "recover after a snapshot migration lost its map")
    assert "died during a snapshot-mode migration, and its layer map" in line, line
    assert Path(dev.device).is_block_device()
    r = run_cli("stop", dev.device)
    assert r.returncode == 0, r.stderr
    wait_gone(dev.device)


# mirror: the guest's writes meet the loss before the cutover (the policy's reconnect is the
# same in every mode; the soak, ci/soak, restarts servers under each)
def test_nbd_server_killed_before_and_after_the_cutover_then_the_daemon(
        make_image: MakeImage, nbd_server: NbdServerFactory, serve: ServeFactory,
        fio_loop: FioLoopFactory, orphans: list[str]) -> None:  # fmt: skip
    """DEST an export of qemu-nbd over TCP, larger than the device (allowed).  Its server is
    killed (SIGKILL) a quarter into the copy and started again on the same file and port a
    second later: the migration dials again and completes.  Now the export is the disk: its
    server is killed again, and the guest's requests wait for the daemon to dial it once
    more; none fails.  Then the daemon is killed: `serve URI --recover` takes the device over
    with the export as its image (the device keeps its size).  fio writes and verifies
    throughout; the export holds what the device shows."""
    t = Steps("nbd-restarts")
    image = make_image(SIZE, data=pattern(7, 48 * MiB))
    server = nbd_server("qemu-nbd", "tcp", SIZE + 8 * MiB)
    dev = serve(image, "--queues", "2")
    orphans.append(dev.device)
    busy = fio_loop(dev.device, *BUSY)
    busy.wait_runs(1)
    t("server, serve, first fio job")
    proc = start_migrate(dev.device, server.uri, "--mode", "mirror", "--speed", "8M")
    wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] // 4,
                   timeout=60, what="a quarter copied")  # fmt: skip
    server.stop(kill=True)
    wait_migration(dev.device, lambda m: m["phase"] == "reconnecting", timeout=60,
                   what="the lost destination noticed")  # fmt: skip
    time.sleep(1)
    server.restart()
    t("killed a quarter in, restarted")
    finish_migrate(proc)
    mig = check_completed(dev.device, server.uri, "mirror", lost_connections=True)
    assert mig["reconnects"] >= 1, mig
    t("migration")
    server.stop(kill=True)
    time.sleep(3)  # fio's requests meet the lost connection, and wait
    st = device_status(dev.device)
    assert st["stats"]["conn_down"] > 0 and st["stats"]["conn_waiting"] > 0, st["stats"]
    server.restart()
    deadline = time.monotonic() + 60
    while (st := device_status(dev.device))["reconnects"] < 1:
        assert time.monotonic() < deadline, f"not reconnected: {st}"
        time.sleep(0.2)
    busy.wait_runs(busy.runs + 1)
    io = device_status(dev.device)["stats"]
    assert io["errors"] == 0 and io["conn_waits"] > 0 and io["conn_failed"] == 0, io
    assert io["conn_down"] == 0 and io["conn_waiting"] == 0, io
    t("killed after the cutover, restarted: reconnected, no request failed")
    kill(dev)
    r = run_cli("serve", str(image), "--recover", dev.device)
    line = assert_one_line_error(r, "recover with the migrated-from image")
    assert line == (f"ublkmig: error: {dev.device} was serving {server.uri}: recover it with "
                    "that image"), line
    again = serve(server.uri, "--recover", dev.device)
    st = device_status(again.device)
    assert st["image"] == server.uri and st["size"] == SIZE, st
    busy.mark()
    busy.stop()
    busy.verify()
    t("daemon killed, recovered with the export, fio verify")
    assert server.file is not None
    digest = assert_same_bytes(again.device, server.file, SIZE)
    assert device_status(again.device)["stats"]["errors"] == 0
    again.stop()
    assert sha256_of(server.file, SIZE) == digest, "the export differs from what the device showed"
