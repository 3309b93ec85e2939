"""Acknowledged writes are never lost: the data plane through the simulator against a
destination that misbehaves at chosen moments (tests/support/faulty_nbd.py, or a file), each
test ending with a byte-for-byte comparison of what the disk is afterwards.

- a mirrored write whose destination part fails is recorded at once; the cutover holds no
  guest request, but such a write that fails in its window (while the record is made) is
  not answered until the record says which image is the disk, and one that fails after the
  switch is tried again on the destination;
- a destination that lost writes it acknowledged but had not flushed (a restart) gets them
  copied again after the reconnect;
- a chunk a mirrored write reached on a new destination is not skipped as zeroes later;
- an NBD export serving the device (`serve nbd://...`, or a destination after the cutover)
  that loses its connection holds the guest's requests until a new one is dialled, each for a
  bounded time, instead of failing them.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.faulty_nbd import FaultyNbd
from support.images import sparse_image

from ublkmig import native
from ublkmig.native import MigMode, MigrationConfig, NativeError, Op, Pass, Sim

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

SIZE = 4 << 20
CHUNK = 64 << 10


def random_source(path: Path, seed: int) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    path.write_bytes(data)
    return data


def read_all(sim: Sim) -> bytes:
    return b"".join(sim.read(off, 256 << 10) for off in range(0, SIZE, 256 << 10))


def in_sync_mirror(sim: Sim, dest: str | Path, zeroed: bool = False) -> native.Target:
    if isinstance(dest, Path):
        sparse_image(dest, SIZE)
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


def poll_until(sim: Sim, cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Run the simulator's ring (it has no thread) until ``cond()``."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        sim.poll()
        time.sleep(0.001)


def test_a_destination_failure_before_the_cutover_refuses_it(tmp: Path) -> None:
    """A mirrored write in flight (source slow) whose destination part failed before the
    cutover: the cutover is refused before any record, the write succeeds from the source,
    and the source, still the disk, has it."""
    random_source(tmp / "src.img", 2)
    new = b"\x22" * 8192
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        sim.set_delay(0, 300_000_000)
        srv.fail_writes = 1
        sim.submit(Op.WRITE, 5 * CHUNK, data=new)
        assert srv.failed_write.wait(5)
        poll_until(sim, lambda: t.stats().dest_errors == 1, "the failure")
        records: list[str] = []
        with pytest.raises(NativeError) as e:
            t.cutover(lambda: records.append("record"))
        assert e.value.errno == errno.EIO and records == [], (e.value, records)
        c = sim.wait()
        assert c is not None and c.result == len(new)
        s = t.stats()
        assert not s.cut_over and s.dest_errors == 1 and s.dirty_chunks == 1, s
        sim.set_delay(0, 0)
        t.finish()
        assert sim.read(5 * CHUNK, len(new)) == new
    assert (tmp / "src.img").read_bytes()[5 * CHUNK : 5 * CHUNK + len(new)] == new


def window_failure(t: native.Target, sim: Sim, srv: FaultyNbd, new: bytes) -> None:
    """In the cutover's window: a mirrored write whose destination part fails, and which is
    then not answered (parked) while the record may name the destination."""
    sim.submit(Op.WRITE, 5 * CHUNK, data=new)
    assert srv.failed_write.wait(5)
    poll_until(sim, lambda: t.stats().parked == 1, "the write to wait")
    s = t.stats()
    assert s.dest_errors == 1 and sim.inflight == 1, s


def test_a_destination_failure_in_the_cutovers_window_waits_for_its_end(tmp: Path) -> None:
    """The destination fails a mirrored write while the cutover's record is being made: the
    write is not answered while the record may name the destination; the switch is refused,
    the record undone, and only then does the write succeed from the source, which stays the
    disk and has it."""
    random_source(tmp / "src.img", 5)
    new = b"\x55" * 8192
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        srv.fail_writes = 1
        steps: list[str] = []

        def record() -> None:
            steps.append("record")
            window_failure(t, sim, srv, new)

        def unrecord() -> None:
            steps.append("unrecord")
            assert sim.inflight == 1, "answered before the record named the source again"

        with pytest.raises(NativeError) as e:
            t.cutover(record, unrecord)
        assert e.value.errno == errno.EIO and steps == ["record", "unrecord"], (e.value, steps)
        c = sim.wait()  # routed again once the window closed
        assert c is not None and c.result == len(new)
        assert not t.stats().cut_over
        t.finish()
        assert sim.read(5 * CHUNK, len(new)) == new
    assert (tmp / "src.img").read_bytes()[5 * CHUNK : 5 * CHUNK + len(new)] == new


def test_a_cutover_whose_record_cannot_be_undone_is_made(tmp: Path) -> None:
    """As above, but the record cannot be made to name the source again: the cutover is
    made (the record may name the destination), and the write that failed there is tried
    again there and succeeds: the destination, now the disk, has it."""
    src = random_source(tmp / "src.img", 6)
    new = b"\x66" * 8192
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        srv.fail_writes = 1

        def unrecord() -> None:
            raise OSError(errno.EROFS, "read-only state folder")

        t.cutover(lambda: window_failure(t, sim, srv, new), unrecord)
        c = sim.wait()
        assert c is not None and c.result == len(new)
        assert t.stats().cut_over
        assert sim.read(5 * CHUNK, len(new)) == new
        t.finish()
    expect = src[: 5 * CHUNK] + new + src[5 * CHUNK + len(new) :]
    assert bytes(srv.data) == expect


def test_a_destination_failure_after_the_switch_is_tried_there_again(tmp: Path) -> None:
    """A mirrored write in flight at the switch whose destination part fails after it: the
    destination is the disk, so the write is tried there again, not answered from the
    source; the destination ends with it."""
    src = random_source(tmp / "src.img", 7)
    new = b"\x77" * 8192
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        srv.fail_writes, srv.fail_delay = 1, 0.3
        sim.submit(Op.WRITE, 5 * CHUNK, data=new)
        t.cutover()
        assert srv.failed_write.wait(5)
        c = sim.wait()
        assert c is not None and c.result == len(new)
        s = t.stats()
        assert s.cut_over and s.parked == 1 and s.error == 0, s
        t.finish()
    expect = src[: 5 * CHUNK] + new + src[5 * CHUNK + len(new) :]
    assert bytes(srv.data) == expect


def test_the_mirror_cutover_holds_no_guest_request(tmp: Path) -> None:
    """Mirror mode: guest writes go on (to both sides) while the record is made, the mode
    cannot change then, and the cutover pauses nothing."""
    src = random_source(tmp / "src.img", 3)
    with Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, tmp / "dest.img")

        def record() -> None:
            assert sim.write(0, b"\x33" * 4096) == 4096
            with pytest.raises(NativeError) as e:
                t.set_mode(MigMode.DBT)
            assert e.value.errno == errno.EBUSY, e.value

        t.cutover(record)
        s = t.stats()
        assert s.cut_over and not s.paused and s.parked == 0 and s.cutover_pause_ns == 0, s
        assert s.mirrored_writes == 1, s
        t.finish()
    assert (tmp / "dest.img").read_bytes() == b"\x33" * 4096 + src[4096:]


def test_the_dbt_cutover_pause_is_measured(tmp: Path) -> None:
    src = random_source(tmp / "src.img", 8)
    with Sim(tmp / "src.img") as sim:
        t = sim.target()
        sparse_image(tmp / "dest.img", SIZE)
        t.mig_start(MigrationConfig(dest=tmp / "dest.img", mode=MigMode.DBT, chunk_size=CHUNK))
        t.copy_pass(Pass.ALL)
        sim.write(0, b"\x88" * 4096)  # dirty
        t.pause()
        t.copy_pass(Pass.FINAL)
        t.cutover(lambda: time.sleep(0.02))
        s = t.stats()
        assert s.cut_over and s.paused and 20_000_000 <= s.cutover_pause_ns < 5_000_000_000, s
        t.resume()
        t.finish()
    assert (tmp / "dest.img").read_bytes() == b"\x88" * 4096 + src[4096:]


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
        t.mig_start(MigrationConfig(dest=sparse_image(tmp / "dest.img", SIZE), mode=MigMode.MIRROR,
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


def start_snapshot(sim: Sim, tmp: Path, prefix: Path) -> native.Target:
    """A snapshot migration to a new file, its deltas and layer map at ``prefix``."""
    t = sim.target()
    t.mig_start(MigrationConfig(dest=sparse_image(tmp / "dest.img", SIZE), mode=MigMode.SNAPSHOT,
                                chunk_size=4 * CHUNK, delta_path=prefix))  # fmt: skip
    return t


def _copy_files(names: list[Path], into: Path) -> None:
    """What a daemon killed by SIGKILL leaves: the files as the page cache holds them."""
    into.mkdir()
    for p in names:
        if p.exists():
            shutil.copyfile(p, into / p.name)


def test_snapshot_writes_survive_the_daemon(tmp: Path) -> None:
    """Snapshot mode: the deltas and the layer map beside the source are named files.  A copy
    on write is in the map at once, so what a daemon leaves when it dies folds back
    (ublkmig.snapshot) into the image the guest saw; after a reboot only the records a FLUSH
    (or FUA write) committed count.  The files go when the migration ends."""
    from ublkmig import snapshot

    src = tmp / "src.img"
    view = bytearray(random_source(src, 4))
    prefix = snapshot.delta_prefix(src, None)
    with Sim(src) as sim:
        t = start_snapshot(sim, tmp, prefix)
        assert snapshot.map_path(prefix).exists() and Path(f"{prefix}.1").exists()
        for off, seed in ((0, 1), (5 * CHUNK + 4096, 2), (SIZE - 8192, 3)):
            data = random.Random(seed).randbytes(8192)
            assert sim.write(off, data) == len(data)
            view[off:off + len(data)] = data
        # in the file at once (a daemon killed now leaves them), not committed (after a
        # power cut they are not trusted: their chunks' copied data may not be durable)
        lm = snapshot.read_map(prefix)
        assert lm is not None and lm.same_boot and lm.newest == {0: 1, 1: 1, 15: 1}, lm
        assert lm.committed == 0, lm
        after_reboot = snapshot.read_map(prefix, same_boot=False)
        assert after_reboot is not None and after_reboot.newest == {}, after_reboot
        assert sim.flush() == 0
        after_reboot = snapshot.read_map(prefix, same_boot=False)
        assert after_reboot is not None and after_reboot.newest == {0: 1, 1: 1, 15: 1}
        assert (tmp / "src.img").read_bytes() != bytes(view), "the source is frozen"
        files = [src, snapshot.map_path(prefix), Path(f"{prefix}.1")]
        _copy_files(files, tmp / "killed")
        seen = {"killed": bytes(view)}
        # a second layer, and a FUA write in it
        t.new_delta()
        data = random.Random(5).randbytes(4096)
        assert sim.write(9 * CHUNK, data, fua=True) == 4096
        view[9 * CHUNK:9 * CHUNK + 4096] = data
        lm = snapshot.read_map(prefix, same_boot=False)
        assert lm is not None and lm.newest[2] == 2 and lm.committed == 4, lm
        _copy_files([*files, Path(f"{prefix}.2")], tmp / "killed-later")
        seen["killed-later"] = bytes(view)
        assert read_all(sim) == bytes(view)
        t.finish()  # cancelled: folded back into the source, the files removed
    assert src.read_bytes() == bytes(view)
    for p in (snapshot.map_path(prefix), Path(f"{prefix}.1"), Path(f"{prefix}.2")):
        assert not p.exists(), f"{p} is left after the migration ended"

    for where, expect in seen.items():
        lm = snapshot.read_map(tmp / where / prefix.name)
        assert lm is not None
        fd = os.open(tmp / where / "src.img", os.O_RDWR)
        try:
            assert snapshot.fold_back(lm, fd, SIZE) == len(lm.newest)
        finally:
            os.close(fd)
        assert (tmp / where / "src.img").read_bytes() == expect, f"{where}: folded back wrong"
        assert not snapshot.map_path(tmp / where / prefix.name).exists()


def test_a_layer_map_read_after_a_crash(tmp: Path) -> None:
    """The reader of the layer map: a chunk's last record names its layer (0: folded back
    into the source, so a second fold-back skips it), a torn last record is ignored, after a
    reboot only the committed records count, and a damaged header or committed record is an
    error, not an empty map."""
    from ublkmig import snapshot
    from ublkmig.errors import UserError

    prefix = tmp / "disk.img.ublkmig-delta"

    def write(records: list[tuple[int, int]], committed: int, tail: bytes = b"",
              boot: bytes | None = None) -> None:  # fmt: skip
        head = snapshot.HEADER.pack(snapshot.MAGIC, 1, snapshot.REC.size, SIZE, CHUNK,
                                    committed, boot if boot is not None else snapshot.boot_id())
        body = b"".join(snapshot.REC.pack(snapshot.RECORD, g, c) for c, g in records)
        snapshot.map_path(prefix).write_bytes(head + body + tail)

    write([(3, 1), (5, 1), (3, 2), (5, 0)], committed=2, tail=b"\x55\x42")
    lm = snapshot.read_map(prefix)
    assert lm is not None and lm.same_boot and lm.newest == {3: 2} and lm.records == 4, lm
    lm = snapshot.read_map(prefix, same_boot=False)
    assert lm is not None and lm.newest == {3: 1, 5: 1}, lm
    write([(3, 1), (5, 1)], committed=2, boot=bytes(16))  # another boot: committed only
    lm = snapshot.read_map(prefix)
    assert lm is not None and not lm.same_boot and lm.newest == {3: 1, 5: 1}, lm
    write([(3, 1), (SIZE // CHUNK, 1)], committed=2)  # a committed record out of range
    with pytest.raises(UserError, match="damaged"):
        snapshot.read_map(prefix)
    snapshot.map_path(prefix).write_bytes(b"UBMLAYER" + bytes(10))
    with pytest.raises(UserError, match="damaged"):
        snapshot.read_map(prefix)
    snapshot.map_path(prefix).unlink()
    assert snapshot.read_map(prefix) is None


def test_serve_folds_back_what_a_dead_snapshot_migration_left(tmp: Path) -> None:
    """``serve IMAGE`` finds a layer map beside the image (a snapshot migration whose daemon
    died), folds its deltas back into the image and removes them before serving; read-only,
    it refuses (it cannot fold); deltas without a map are garbage, removed."""
    from ublkmig import daemon, snapshot
    from ublkmig.errors import UserError

    src = tmp / "src.img"
    view = bytearray(random_source(src, 6))
    prefix = snapshot.delta_prefix(src, None)
    with Sim(src) as sim:
        t = start_snapshot(sim, tmp, prefix)
        data = random.Random(7).randbytes(3 * CHUNK)
        assert sim.write(2 * CHUNK, data) == len(data)
        view[2 * CHUNK:5 * CHUNK] = data
        _copy_files([src, snapshot.map_path(prefix), Path(f"{prefix}.1")], tmp / "left")
        t.finish()
    image = tmp / "left" / "src.img"
    ro = daemon.ServeOptions(image=image, read_only=True)
    opened = daemon.open_image(ro)
    try:
        with pytest.raises(UserError, match="serve it without --read-only once"):
            daemon.fold_back_snapshot(ro, opened)
    finally:
        opened.close()
    opts = daemon.ServeOptions(image=image)
    opened = daemon.open_image(opts)
    try:
        daemon.fold_back_snapshot(opts, opened)
    finally:
        opened.close()
    assert image.read_bytes() == bytes(view)
    left = tmp / "left" / prefix.name
    assert not snapshot.map_path(left).exists() and not snapshot.leftovers(left)
    Path(f"{left}.1").write_bytes(b"garbage")  # a delta without its map
    opened = daemon.open_image(opts)
    try:
        daemon.fold_back_snapshot(opts, opened)
    finally:
        opened.close()
    assert not snapshot.leftovers(left) and image.read_bytes() == bytes(view)


# --- the backend serving the device loses its connection (NBD) ------------------------------
def wait_until(sim: Sim, what: str, cond: object) -> None:
    deadline = time.monotonic() + 5
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        sim.poll()
        time.sleep(0.001)
    assert cond(), what  # type: ignore[operator]


def write_across_a_dropped_connection(sim: Sim, srv: FaultyNbd, data: bytes) -> None:
    """The server drops every connection; a write sent then waits for the new one that
    reconnect() dials, and is done there, as are the writes after it."""
    srv.drop()
    ticket = sim.submit(Op.WRITE, 0, data=data)
    wait_until(sim, "the write waits for the connection", lambda: sim.stats()["conn_waiting"])
    assert sim.inflight == 1, "failed instead of waiting"
    assert sim.stats()["conn_down"] >= 1
    sim.reconnect()
    c = sim.wait()
    assert c is not None and c.ticket == ticket and c.result == len(data), c
    assert sim.write(SIZE - 4096, data[:4096]) == 4096  # the new connection serves on
    s = sim.stats()
    assert s["conn_waiting"] == 0 and s["conn_waits"] == 1 and s["conn_failed"] == 0, s
    assert s["errors"] == 0 and s["conn_down"] == 0, s


def test_requests_to_an_nbd_source_wait_for_a_lost_connection(tmp: Path) -> None:
    """`serve nbd://...`: a dropped connection holds the guest's requests until a new one is
    dialled, instead of failing every one of them for good."""
    with FaultyNbd(SIZE) as srv, Sim(srv.uri) as sim:
        assert sim.size == SIZE
        sim.write(0, b"\x61" * 8192)
        write_across_a_dropped_connection(sim, srv, b"\x62" * 8192)
        expect = bytearray(SIZE)
        expect[:8192] = b"\x62" * 8192
        expect[SIZE - 4096 :] = b"\x62" * 4096
        assert read_all(sim) == expect
        assert sim.flush() == 0
        assert srv.durable == expect


def test_a_request_waits_for_a_lost_connection_only_so_long(tmp: Path) -> None:
    with FaultyNbd(SIZE) as srv, Sim(srv.uri) as sim:
        sim.set_wait(0.5)
        sim.write(0, b"\x63" * 4096)
        srv.drop()
        t0 = time.monotonic()
        sim.submit(Op.WRITE, 0, data=b"\x64" * 4096)
        c = sim.wait()  # nobody reconnects: the timer ends it
        waited = time.monotonic() - t0
        assert c is not None and c.result in (-errno.ECONNRESET, -errno.EPIPE), c
        assert 0.5 <= waited < 3, waited
        s = sim.stats()
        assert s["conn_waits"] == 1 and s["conn_failed"] == 1 and s["conn_waiting"] == 0, s
        sim.reconnect()  # the server is there: the device works again
        assert sim.read(0, 4096) == b"\x63" * 4096


def test_an_error_the_server_answers_is_not_waited_for(tmp: Path) -> None:
    with FaultyNbd(SIZE) as srv, Sim(srv.uri) as sim:
        srv.fail_writes = 1
        c = sim.run(Op.WRITE, 0, data=b"\x65" * 4096)
        assert c.result == -errno.EIO, c
        assert sim.stats()["conn_waits"] == 0


def test_a_device_serving_an_nbd_export_is_not_migrated(tmp: Path) -> None:
    with FaultyNbd(SIZE) as srv, Sim(srv.uri) as sim:
        with pytest.raises(NativeError) as e:
            sim.target().mig_start(MigrationConfig(dest=sparse_image(tmp / "d.img", SIZE),
                                                   mode=MigMode.MIRROR, chunk_size=CHUNK))
        assert e.value.errno == errno.EOPNOTSUPP and "NBD export" in str(e.value), e.value


def test_after_a_cutover_to_nbd_requests_wait_for_a_lost_connection(tmp: Path) -> None:
    src = random_source(tmp / "src.img", 8)
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = in_sync_mirror(sim, srv.uri)
        t.cutover()
        t.finish()
        write_across_a_dropped_connection(sim, srv, b"\x66" * 8192)
        expect = bytearray(src)
        expect[:8192] = b"\x66" * 8192
        expect[SIZE - 4096 :] = b"\x66" * 4096
        assert read_all(sim) == expect
        assert srv.data == expect
    assert (tmp / "src.img").read_bytes() == src, "the source was written after the cutover"
