"""Live migration of a real ublk device while fio writes and verifies, in each mode.

The image (``SIZE``) is laid out in four quarters:

- STATIC: a known pattern written before the migration; during the migration part of it
  is discarded and part zeroed (write-zeroes), which must route like writes;
- PHASE1: written by fio (crc32c) before the migration, verified with fio's verify_only
  after the cutover;
- BUSY: fio jobs writing and verifying one after another, before, during and after the
  migration (vmlib.FioLoop), verified once more after the cutover;
- HOLES: never written: the source holds nothing there, and the device must read zeros
  after the cutover, even over a destination full of junk.

After the cutover the device must serve from DEST, the same bytes as DEST; and DEST, once
the daemon stopped, must hold exactly what the device showed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli
from vmlib import (
    MODES,
    FioLoop,
    MakeImage,
    ServeFactory,
    Steps,
    assert_same_bytes,
    check_completed,
    device_status,
    finish_migrate,
    pattern,
    read_device,
    run_fio,
    run_ok,
    sha256_of,
    start_migrate,
    wait_migration,
)

from ublkmig.bench.nbd_server import NbdServer

MiB = 1 << 20
SIZE = 64 * MiB
Q = SIZE // 4
STATIC, PHASE1, BUSY, HOLES = 0, Q, 2 * Q, 3 * Q
BUSY_LEN = Q  # fio jobs, one after another
DISCARDED = (STATIC + 2 * MiB, 3 * MiB)  # (offset, length) inside STATIC
ZEROED = (STATIC + 9 * MiB + 64 * 1024, 2 * MiB)
FioLoopFactory = Callable[..., FioLoop]
NbdServerFactory = Callable[..., NbdServer]
SPEED = "24M"


def phase1_job() -> dict[str, Any]:
    return dict(name="phase1", rw="randwrite", bsrange="4k-256k", blockalign="4k", iodepth=16,
                ioengine="io_uring", direct=1, verify="crc32c", verify_fatal=1, offset=PHASE1,
                size=Q, randseed=77)


# each mode to a new (sparse) file; once to an existing file full of junk, in snapshot mode
# (the one that folds layers, discarded ranges included, into the destination); each mode
# to an NBD export, each server and transport once: qemu-nbd over TCP and nbdkit's file
# plugin over a unix socket, both exporting a file full of junk, and nbdkit's memory plugin
# over TCP (the NBD backend is the same code for every mode: the fault tests take it through
# lost connections in the others).  On every kernel: each mode to a file, and one to NBD (the
# guest's data reaches the destination from the request's buffer, which the data path sets).
NBD_KINDS = {"qemu-nbd-tcp": ("qemu-nbd", "tcp"), "nbdkit-file-unix": ("nbdkit-file", "unix"),
             "nbdkit-memory-tcp": ("nbdkit-memory", "tcp")}
_every = pytest.mark.every_kernel


@pytest.mark.parametrize(("mode", "dest_kind"),
                         [*(pytest.param(m, "new", marks=_every) for m in MODES), ("auto", "new"),
                          ("snapshot", "junk"),
                          pytest.param("mirror", "qemu-nbd-tcp", marks=_every),
                          ("dbt", "nbdkit-file-unix"), ("snapshot", "nbdkit-memory-tcp")])
def test_fio_verify_across_migration(mode: str, dest_kind: str, make_image: MakeImage,
                                     nbd_server: NbdServerFactory, serve: ServeFactory,
                                     fio_loop: FioLoopFactory, scratch: Path) -> None:
    t = Steps(f"{mode}-{dest_kind}")
    static = pattern(5, Q)
    image = make_image(SIZE, data=static)
    dest = scratch / "dest.img"
    target: Path | str = dest
    server = None
    if dest_kind in NBD_KINDS:
        if dest_kind != "nbdkit-memory-tcp":
            dest = scratch / "nbd.img"
            dest.write_bytes(pattern(666, MiB) * (SIZE // MiB))
        server = nbd_server(*NBD_KINDS[dest_kind], SIZE)
        target = server.uri
    if dest_kind == "junk":
        dest.write_bytes(pattern(666, MiB) * (SIZE // MiB))  # all to overwrite or zero
    dev = serve(image, "--queues", "2")
    t("images, serve")

    run_fio(dev.device, cwd=scratch, **phase1_job())
    t("fio phase 1")
    busy = fio_loop(dev.device, BUSY, BUSY_LEN)
    busy.wait_runs(1)  # writes before the migration
    t("fio loop: first job")

    writes_before = device_status(dev.device)["stats"]["writes"]
    # a speed limit, so that the copy takes a few of fio's jobs
    proc = start_migrate(dev.device, target, "--mode", mode, "--chunk-size", "512K",
                         "--speed", SPEED)
    # discard and write-zeroes once the copy is past them (they must reach DEST too)
    done = max(DISCARDED[0] + DISCARDED[1], ZEROED[0] + ZEROED[1])
    wait_migration(dev.device, lambda m: max(m["cursor"], m["chunks_copied"] * m["chunk_size"])
                   >= done, timeout=60, what="past STATIC's discarded and zeroed ranges")
    t("migration started")
    run_ok("blkdiscard", "-o", str(DISCARDED[0]), "-l", str(DISCARDED[1]), dev.device)
    run_ok("blkdiscard", "-z", "-o", str(ZEROED[0]), "-l", str(ZEROED[1]), dev.device)
    out = finish_migrate(proc)
    t("migration")
    busy.mark()
    busy.stop()  # a job that started after the cutover, verified, has finished
    t("fio loop: a job after the cutover")
    mig = check_completed(dev.device, target, mode)
    assert mig["io"]["writes"] > writes_before, mig["io"]
    print(f"{mode}/{dest_kind}: {out.strip().splitlines()[-1]}; fio wrote "
          f"{busy.written // MiB} MiB in {busy.runs} jobs")

    # fio's verify pass over its two ranges, now read from DEST
    run_fio(dev.device, cwd=scratch, verify_only=1, **phase1_job())
    busy.verify()
    t("fio verify")
    expect = bytearray(static)
    for off, n in (DISCARDED, ZEROED):
        expect[off - STATIC:off - STATIC + n] = bytes(n)
    assert read_device(dev.device, STATIC, Q) == expect, "STATIC differs after the migration"
    assert read_device(dev.device, HOLES, Q) == bytes(Q), "HOLES do not read as zeros"

    # the device serves DEST: same bytes; and DEST holds them once the daemon is gone
    if server is not None and server.file is None:  # nbdkit's memory: fetched over NBD
        dest = server.read_export(scratch / "export.img")
    digest = assert_same_bytes(dev.device, dest, SIZE)
    assert device_status(dev.device)["stats"]["errors"] == 0
    t("compare")
    dev.stop()
    if server is not None and server.file is None:
        dest = server.read_export(scratch / "export-after-stop.img")
    assert dest.stat().st_size == SIZE
    assert sha256_of(dest) == digest, "DEST differs from what the device showed"
    t("stop, compare")


@pytest.mark.parametrize("mode", ["snapshot"])
def test_no_cutover_then_cutover_with_verify(mode: str, make_image: MakeImage,
                                             serve: ServeFactory, fio_loop: FioLoopFactory,
                                             scratch: Path) -> None:
    """``--no-cutover --verify --wait`` returns once in sync; the copy is kept in sync while
    fio writes on; ``ublkmig cutover`` then verifies (paused) and switches."""
    t = Steps(f"no-cutover-{mode}")
    static = pattern(8, Q)
    image = make_image(SIZE, data=static)
    dest = scratch / "dest.img"
    dev = serve(image, "--queues", "2")
    busy = fio_loop(dev.device, BUSY, BUSY_LEN)
    busy.wait_runs(1)
    t("serve, first fio job")
    out = finish_migrate(start_migrate(dev.device, dest, "--mode", mode, "--no-cutover",
                                       "--verify"), expect="in sync:")
    assert wait_migration(dev.device, lambda m: True)["phase"] == "in-sync"
    t("in sync")
    busy.wait_runs(busy.runs + 2)  # writes while held in sync
    assert device_status(dev.device)["migration"]["phase"] == "in-sync"
    t("fio while in sync")
    r = run_cli("cutover", dev.device)
    assert r.returncode == 0 and "completed:" in r.stdout, f"{r.stdout}\n{r.stderr}"
    t("cutover")
    busy.mark()
    busy.stop()
    mig = check_completed(dev.device, dest, mode)
    assert mig["verify"] is True and mig["verify_mismatches"] == 0, mig
    print(f"{mode}: {out.strip().splitlines()[-1]}; {r.stdout.strip()}")
    busy.verify()
    assert read_device(dev.device, STATIC, Q) == static
    digest = assert_same_bytes(dev.device, dest, SIZE)
    dev.stop()
    assert sha256_of(dest) == digest, "DEST differs from what the device showed"
    t("verify, compare")
