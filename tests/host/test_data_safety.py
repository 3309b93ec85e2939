"""Acknowledged writes are never lost: the data plane through the simulator against a
destination that misbehaves at chosen moments (tests/host/faulty_nbd.py, or a file), each
test ending with a byte-for-byte comparison of what the disk is afterwards.

- a mirrored write whose destination part fails is recorded at once, and the cutover waits
  for the writes in flight (its hold) before it checks and switches;
- a destination that lost writes it acknowledged but had not flushed (a restart) gets them
  copied again after the reconnect;
- a chunk a mirrored write reached on a new destination is not skipped as zeroes later.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faulty_nbd import FaultyNbd

from ublkmig import native
from ublkmig.native import MigMode, MigrationConfig, NativeError, Op, Pass, Sim

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

SIZE = 4 << 20
CHUNK = 64 << 10


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ubm-safe-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def random_source(path: Path, seed: int) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    path.write_bytes(data)
    return data


def read_all(sim: Sim) -> bytes:
    return b"".join(sim.read(off, 256 << 10) for off in range(0, SIZE, 256 << 10))


def new_file(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def in_sync_mirror(sim: Sim, dest: str | Path, zeroed: bool = False) -> native.Target:
    if isinstance(dest, Path):
        new_file(dest)
    t = sim.target()
    t.mig_start(MigrationConfig(dest=dest, mode=MigMode.MIRROR, chunk_size=CHUNK,
                                dest_zeroed=zeroed))  # fmt: skip
    t.copy_pass(Pass.ALL)
    s = t.stats()
    assert s.chunks_copied == s.nr_chunks and s.dirty_chunks == 0, s
    return t


def test_a_destination_failure_is_recorded_when_it_happens(tmp: Path) -> None:
    """The destination's EIO arrives while the source's part of the write is still in flight:
    the chunk is dirty and the error recorded then, not when the request ends."""
    random_source(tmp / "src.img", 1)
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        sim.set_delay(0, 1_000_000_000)  # source writes take 1 s
        srv.fail_writes = 1
        sim.submit(Op.WRITE, 3 * CHUNK, data=b"\x11" * 4096)
        assert srv.failed_write.wait(5)
        deadline = time.monotonic() + 0.5
        while not t.stats().dest_errors and time.monotonic() < deadline:
            sim.poll()  # the reply's CQE: run the ring without waiting
            time.sleep(0.001)
        s = t.stats()
        assert sim.inflight == 1, "the source's part should still be in flight"
        assert s.dest_errors == 1 and s.dirty_chunks == 1 and s.error == -errno.EIO, s
        c = sim.wait()
        assert c is not None and c.result == 4096  # the guest's write: done on the source
        t.finish()


@pytest.mark.parametrize("fail_delay", [0.0, 0.2], ids=["fails-before-hold", "fails-in-hold"])
def test_the_cutover_holds_until_mirrored_writes_finish(tmp: Path, fail_delay: float) -> None:
    """A cutover while a mirrored write is in flight (source slow) whose destination part
    fails (before the cutover begins, or while it holds): the cutover is refused, the write
    succeeds from the source, and the source, still the disk, has it."""
    random_source(tmp / "src.img", 2)
    new = b"\x22" * 8192
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        sim.set_delay(0, 300_000_000)
        srv.fail_writes, srv.fail_delay = 1, fail_delay
        sim.submit(Op.WRITE, 5 * CHUNK, data=new)
        if not fail_delay:
            assert srv.failed_write.wait(5)
        with pytest.raises(NativeError) as e:
            t.cutover()
        assert e.value.errno == errno.EIO, e.value
        c = sim.wait()
        assert c is not None and c.result == len(new)
        s = t.stats()
        assert not s.cut_over and s.dest_errors == 1 and s.dirty_chunks == 1, s
        sim.set_delay(0, 0)
        assert sim.read(5 * CHUNK, len(new)) == new
        t.finish()
        assert sim.read(5 * CHUNK, len(new)) == new
        assert (tmp / "src.img").read_bytes()[5 * CHUNK : 5 * CHUNK + len(new)] == new


def test_the_cutover_pause_is_measured(tmp: Path) -> None:
    src = random_source(tmp / "src.img", 3)
    with Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, tmp / "dest.img")
        sim.write(0, b"\x33" * 4096)  # mirrored
        recorded: list[int] = []
        t.cutover(lambda: recorded.append(t.stats().paused))
        s = t.stats()
        assert recorded == [1], "the record is made with guest I/O held"
        assert s.cut_over and not s.paused and 0 < s.cutover_pause_ns < 5_000_000_000, s
        assert sim.read(0, 4096) == b"\x33" * 4096
        t.finish()
    assert (tmp / "dest.img").read_bytes() == b"\x33" * 4096 + src[4096:]


def test_a_failed_cutover_record_leaves_the_source_the_disk(tmp: Path) -> None:
    src = random_source(tmp / "src.img", 4)
    with Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, tmp / "dest.img")

        def record() -> None:
            raise OSError(errno.EROFS, "read-only state folder")

        with pytest.raises(OSError):
            t.cutover(record)
        s = t.stats()
        assert not s.cut_over and not s.paused, s
        sim.write(0, b"\x44" * 4096)  # released, to the source
        t.finish()
    assert (tmp / "src.img").read_bytes() == b"\x44" * 4096 + src[4096:]


def test_writes_a_restarted_server_lost_unflushed_are_copied_again(tmp: Path) -> None:
    """A write-back server restarts, losing what it acknowledged but never flushed; after the
    reconnect those chunks are copied again, and the cutover's destination is the disk."""
    src = random_source(tmp / "src.img", 5)
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        srv.write_back = True
        t = in_sync_mirror(sim, srv.uri)
        sim.write(7 * CHUNK, b"\x55" * 4096)  # mirrored, acknowledged, not flushed
        srv.restart(lose_unflushed=True)
        assert srv.data == bytes(SIZE)
        deadline = time.monotonic() + 5
        while not t.stats().dest_down and time.monotonic() < deadline:
            sim.poll()
            time.sleep(0.001)
        assert t.stats().dest_down, "the restart was not noticed"
        t.reconnect()
        s = t.stats()
        assert s.dirty_chunks == s.nr_chunks, s  # nothing had been flushed
        t.copy_pass(Pass.ALL)
        t.cutover()
        t.finish()
        expect = bytearray(src)
        expect[7 * CHUNK : 7 * CHUNK + 4096] = b"\x55" * 4096
        assert read_all(sim) == expect
        assert srv.durable == expect  # the cutover flushed it


@pytest.mark.parametrize("zeroing", ["write", "write_zeroes", "discard"])
def test_zeroes_over_a_mirrored_write_reach_a_new_destination(tmp: Path, zeroing: str) -> None:
    """Auto mode's sequence: a write mirrored to a chunk the copier has not reached, a switch
    to dirty tracking, then the guest zeroes the range (to the source only: the chunk is not
    copied yet).  The copier must not skip that all-zero chunk on the new destination."""
    (tmp / "src.img").write_bytes(b"")
    os.truncate(tmp / "src.img", SIZE)  # a hole: the copier would skip it all
    with Sim(tmp / "src.img") as sim:
        t = sim.target()
        t.mig_start(MigrationConfig(dest=new_file(tmp / "dest.img"), mode=MigMode.MIRROR,
                                    chunk_size=CHUNK, dest_zeroed=True))  # fmt: skip
        off = 9 * CHUNK
        sim.write(off, b"\x66" * CHUNK)  # mirrored: the destination's chunk holds it
        t.set_mode(MigMode.DBT)
        if zeroing == "write":
            sim.write(off, bytes(CHUNK))
        elif zeroing == "write_zeroes":
            sim.write_zeroes(off, CHUNK)
        else:
            sim.discard(off, CHUNK)
        t.copy_pass(Pass.ALL)
        t.pause()
        t.copy_pass(Pass.FINAL)
        assert t.verify() == 0
        t.cutover()
        t.resume()
        assert sim.read(off, CHUNK) == bytes(CHUNK)
        t.finish()
    assert (tmp / "dest.img").read_bytes() == bytes(SIZE)
