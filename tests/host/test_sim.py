"""The real data plane (request handling + file backend), driven through ubm_sim_* against a
bytearray model: random writes / reads / discards / write-zeroes / flushes, some in flight
together; reads must match the model, and the file must equal it at the end."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from ublkmig import native
from ublkmig.native import Op, Sim

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

SIZE = 256 * 1024
# ext4 (the root fs) and tmpfs (no FALLOC_FL_ZERO_RANGE: the backend's fallback path)
DIRS = [d for d in ("/var/tmp", "/dev/shm") if os.path.isdir(d)]


class DataPlaneMachine(RuleBasedStateMachine):
    lbs = 512
    directory = "/var/tmp"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ubm-sim-", dir=self.directory))
        self.path = self.tmp / "disk.img"
        self.sim: Sim | None = None
        self.model = bytearray()
        self.counts = dict.fromkeys(native.STAT_FIELDS, 0)

    @initialize(seed=st.integers(0, 2**32))
    def start(self, seed: int) -> None:
        self.model = bytearray(random.Random(seed).randbytes(SIZE))
        self.path.write_bytes(self.model)
        self.sim = Sim(self.path, logical_block_size=self.lbs, depth=16)
        assert self.sim.size == SIZE

    def extent(self, data: st.DataObject, max_blocks: int = 64) -> tuple[int, int]:
        blocks = SIZE // self.lbs
        start = data.draw(st.integers(0, blocks - 1), label="start block")
        n = data.draw(st.integers(1, min(max_blocks, blocks - start)), label="blocks")
        return start * self.lbs, n * self.lbs

    def count(self, op: str, nbytes: int = 0) -> None:
        self.counts[op] += 1
        if op == "reads":
            self.counts["read_bytes"] += nbytes
        elif op == "writes":
            self.counts["write_bytes"] += nbytes

    @rule(data=st.data(), seed=st.integers(0, 2**32), fua=st.booleans())
    def write(self, data: st.DataObject, seed: int, fua: bool) -> None:
        assert self.sim is not None
        offset, length = self.extent(data)
        payload = random.Random(seed).randbytes(length)
        assert self.sim.write(offset, payload, fua=fua) == length
        self.model[offset : offset + length] = payload
        self.count("writes", length)
        self.counts["fua_writes"] += fua

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.sim is not None
        offset, length = self.extent(data)
        assert self.sim.read(offset, length) == self.model[offset : offset + length]
        self.count("reads", length)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.sim is not None
        offset, length = self.extent(data, max_blocks=SIZE // self.lbs)
        assert self.sim.discard(offset, length) == length
        self.model[offset : offset + length] = bytes(length)
        self.count("discards")
        assert self.sim.read(offset, length) == bytes(length), "a discarded range reads zeros"
        self.count("reads", length)

    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        assert self.sim is not None
        offset, length = self.extent(data, max_blocks=SIZE // self.lbs)
        assert self.sim.write_zeroes(offset, length) == length
        self.model[offset : offset + length] = bytes(length)
        self.count("write_zeroes")
        assert self.sim.read(offset, length) == bytes(length)
        self.count("reads", length)

    @rule()
    def flush(self) -> None:
        assert self.sim is not None
        assert self.sim.flush() == 0
        self.count("flushes")

    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def batch(self, data: st.DataObject, seed: int) -> None:
        """Several requests in flight at once on disjoint 16 KiB slots (overlapping requests in
        flight together have no defined order, as on a real disk)."""
        assert self.sim is not None
        slot = 16 * 1024
        slots = data.draw(
            st.lists(st.integers(0, SIZE // slot - 1), min_size=2, max_size=8, unique=True),
            label="slots",
        )
        rng = random.Random(seed)
        expected: dict[int, tuple[Op, int, bytes]] = {}
        for s in slots:
            offset = s * slot
            op = rng.choice([Op.READ, Op.WRITE, Op.WRITE_ZEROES, Op.DISCARD])
            if op == Op.WRITE:
                payload = rng.randbytes(slot)
                ticket = self.sim.submit(op, offset, data=payload)
                self.model[offset : offset + slot] = payload
                self.count("writes", slot)
            else:
                ticket = self.sim.submit(op, offset, slot)
                if op == Op.READ:
                    self.count("reads", slot)
                else:
                    self.model[offset : offset + slot] = bytes(slot)
                    self.count("discards" if op == Op.DISCARD else "write_zeroes")
            expected[ticket] = (op, offset, bytes(self.model[offset : offset + slot]))
        assert self.sim.inflight == len(slots)
        while (c := self.sim.wait()) is not None:
            op, offset, content = expected.pop(c.ticket)
            assert c.result == slot, (op, offset, c.result)
            if op == Op.READ:
                assert c.data == content
        assert not expected and self.sim.inflight == 0

    @precondition(lambda self: self.sim is not None)
    @rule()
    def stats_match(self) -> None:
        assert self.sim is not None
        assert self.sim.stats() == self.counts

    def teardown(self) -> None:
        try:
            if self.sim is not None:
                self.sim.flush()
                self.count("flushes")
                assert self.sim.stats() == self.counts
                self.sim.close()
                assert self.path.read_bytes() == self.model, "the file equals the model"
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _machine_test(lbs: int, directory: str) -> type:
    machine = type(
        f"Machine_{lbs}_{directory.strip('/').replace('/', '_')}",
        (DataPlaneMachine,),
        {"lbs": lbs, "directory": directory},
    )
    test = machine.TestCase
    test.settings = settings(
        max_examples=50,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    return test


globals().update(
    (f"TestDataPlane_{lbs}_{d.strip('/').replace('/', '_')}", _machine_test(lbs, d))
    for lbs in (512, 4096)
    for d in DIRS
)


# --- plain cases -----------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\xaa" * (64 * 1024))
    return p


def test_rejects_requests_outside_or_unaligned(image: Path) -> None:
    with Sim(image, logical_block_size=4096) as sim:
        for op, offset, length in [
            (Op.READ, 64 * 1024, 4096),  # past the end
            (Op.READ, 60 * 1024, 8192),  # runs past the end
            (Op.WRITE_ZEROES, 512, 4096),  # not 4096-aligned
            (Op.DISCARD, 0, 0),  # empty
        ]:
            with pytest.raises(native.NativeError) as e:
                sim.submit(op, offset, length)
            assert e.value.errno == errno.EINVAL
            assert e.value.detail  # ubm_last_error() text came along
        assert sim.inflight == 0 and sim.wait() is None


def test_depth_is_a_limit(image: Path) -> None:
    with Sim(image, depth=2) as sim:
        sim.submit(Op.READ, 0, 512)
        sim.submit(Op.READ, 512, 512)
        with pytest.raises(native.NativeError) as e:
            sim.submit(Op.READ, 1024, 512)
        assert e.value.errno == errno.EBUSY
        assert {sim.wait().ticket, sim.wait().ticket} == {0, 1}  # type: ignore[union-attr]
        assert sim.read(1024, 512) == b"\xaa" * 512


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(native.NativeError) as e:
        Sim(tmp_path / "absent.img")
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("lbs", [0, 1024])
def test_bad_block_size(image: Path, lbs: int) -> None:
    with pytest.raises(native.NativeError) as e:
        Sim(image, logical_block_size=lbs)
    assert e.value.errno == errno.EINVAL


def test_direct_io_on_ext4() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ubm-sim-", dir="/var/tmp"))
    try:
        p = tmp / "disk.img"
        p.write_bytes(bytes(1 << 20))
        with Sim(p, logical_block_size=4096, direct=True) as sim:
            payload = os.urandom(12288)
            assert sim.write(4096, payload, fua=True) == len(payload)
            assert sim.read(4096, len(payload)) == payload
            assert sim.stats()["fua_writes"] == 1
        assert p.read_bytes()[4096 : 4096 + len(payload)] == payload
    finally:
        shutil.rmtree(tmp)


def test_closed_sim_refuses() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ubm-sim-"))
    try:
        p = tmp / "disk.img"
        p.write_bytes(bytes(4096))
        sim = Sim(p)
        sim.close()
        sim.close()  # twice is fine
        with pytest.raises(native.NativeError):
            sim.read(0, 512)
    finally:
        shutil.rmtree(tmp)
