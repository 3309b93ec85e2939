"""Where a guest write goes while a migration runs, seen on the files themselves (the data
plane through the simulator, one request at a time, the copier run by hand):

- a write to chunks the copier has not copied yet goes to the source alone, in mirror and
  dbt mode alike (the copier copies those chunks later, with the write in them);
- a write touching a copied chunk reaches the destination at once in mirror mode, and dirties
  its chunks in dbt mode;
- a request parked by a pause counts its wait in pause_wait_ns (where the guest's time went).

Each test ends with the destination equal to the source, byte for byte.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from support.images import sparse_image

from ublkmig import native
from ublkmig.native import MigMode, MigrationConfig, Op, Pass, Sim

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

SIZE = 1 << 20
CHUNK = 64 << 10


def chunk_of(path: Path, c: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(c * CHUNK)
        return f.read(CHUNK)


def start(tmp: Path, mode: MigMode) -> tuple[Sim, native.Target, Path, Path]:
    src, dest = tmp / "src.img", tmp / "dest.img"
    src.write_bytes(random.Random(7).randbytes(SIZE))
    sparse_image(dest, SIZE)
    sim = Sim(src)
    t = sim.target()
    t.mig_start(MigrationConfig(dest=dest, mode=mode, chunk_size=CHUNK))
    return sim, t, src, dest


def cut_over_paused(t: native.Target) -> None:
    """DBT's end: pause, the final pass, the cutover, resume, finish."""
    t.pause()
    t.copy_pass(Pass.FINAL)
    t.cutover()
    t.resume()
    t.finish()


@pytest.mark.parametrize("mode", [MigMode.MIRROR, MigMode.DBT], ids=["mirror", "dbt"])
def test_a_write_ahead_of_the_copier_goes_to_the_source_alone(tmp: Path, mode: MigMode) -> None:
    sim, t, src, dest = start(tmp, mode)
    with sim:
        # two chunks, neither copied yet (the copier has not run)
        assert sim.write(3 * CHUNK - 4096, b"\x5a" * 8192) == 8192
        s = t.stats()
        assert (s.ahead_writes, s.mirrored_writes, s.tracked_writes) == (1, 0, 0), s
        assert s.dirty_chunks == 0, s
        assert chunk_of(dest, 2) == bytes(CHUNK) == chunk_of(dest, 3), "nothing on the dest"
        t.copy_pass(Pass.ALL)
        s = t.stats()
        assert s.chunks_copied == s.nr_chunks and s.dirty_chunks == 0, s
        assert chunk_of(dest, 2)[-4096:] == b"\x5a" * 4096, "the copier took the write"
        t.finish()
    assert dest.read_bytes() == src.read_bytes()


def test_mirror_a_write_to_a_copied_chunk_reaches_the_destination_at_once(tmp: Path) -> None:
    sim, t, src, dest = start(tmp, MigMode.MIRROR)
    with sim:
        t.copy_pass(Pass.ALL)
        assert sim.write(5 * CHUNK, b"\xa5" * 4096) == 4096
        s = t.stats()
        assert (s.ahead_writes, s.mirrored_writes) == (0, 1), s
        assert chunk_of(dest, 5)[:4096] == b"\xa5" * 4096, "mirrored: no copy needed"
        assert s.dirty_chunks == 0, s
        t.cutover()
        t.finish()
    assert dest.read_bytes() == src.read_bytes()


def test_dbt_a_write_to_a_copied_chunk_dirties_it(tmp: Path) -> None:
    sim, t, src, dest = start(tmp, MigMode.DBT)
    with sim:
        t.copy_pass(Pass.ALL)
        # one chunk copied, the next too: both go dirty
        assert sim.write(6 * CHUNK - 4096, b"\x3c" * 8192) == 8192
        s = t.stats()
        assert (s.ahead_writes, s.tracked_writes, s.dirty_chunks) == (0, 1, 2), s
        assert chunk_of(dest, 6)[:4096] != b"\x3c" * 4096, "dbt: the source alone"
        cut_over_paused(t)
    assert dest.read_bytes() == src.read_bytes()


def test_a_request_parked_by_a_pause_counts_its_wait(tmp: Path) -> None:
    sim, t, src, dest = start(tmp, MigMode.DBT)
    with sim:
        t.copy_pass(Pass.ALL)
        t.pause()
        sim.submit(Op.WRITE, 0, data=b"\x11" * 4096)
        time.sleep(0.2)
        sim.poll()
        assert sim.inflight == 1, "parked while paused"
        t.resume()
        c = sim.wait()
        assert c is not None and c.result == 4096
        s = t.stats()
        assert s.parked == 1 and s.pause_wait_ns >= 200_000_000, s
        assert s.chunk_wait_ns == 0, s
        cut_over_paused(t)
    assert dest.read_bytes() == src.read_bytes()
