"""The migration controller (ublkmig.migration) against the real data plane, through the
simulator: guest I/O runs concurrently on the simulator's thread (tests/support/sim_guest.py)
while the controller runs its passes; every run ends with a byte-for-byte comparison with a
model of the disk (the destination after a cutover, the source after a cancel or a failure)."""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from support.images import sparse_image
from support.sim_guest import SimGuest, SimTarget

from ublkmig import native
from ublkmig.migration import Migration, MigrationOptions, MigrationRecord, Mode, Phase, Policy
from ublkmig.native import Sim

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

SIZE = 16 << 20
CHUNK = 64 << 10
SNAPSHOT_CHUNK = 256 << 10
FAST = Policy(
    sample_interval=0.05,
    cutover_window=0.2,
    in_sync_dirty_interval=0.1,
    in_sync_fold_interval=0.2,
    rate_window=2.0,
)


MODES = [
    Mode.MIRROR,
    Mode.DBT,
    Mode.SNAPSHOT,
]


def chunk_size(mode: Mode) -> int:
    # snapshot mode: a request spans at most two chunks (the simulator's largest is 256 KiB)
    return SNAPSHOT_CHUNK if mode is Mode.SNAPSHOT else CHUNK


# The guest stays out of the last MiB, which stays a hole in the source: the
# copier must skip it (on a destination that reads as zeroes) whatever the
# guest did elsewhere.
GUEST_REGION = (0, SIZE - (1 << 20))


def make_source(path: Path, seed: int, size: int = SIZE) -> bytearray:
    """Random data in 3 of every 4 stretches of 256 KiB (never in the last MiB), holes
    elsewhere."""
    rng = random.Random(seed)
    model = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size - (1 << 20), 256 << 10):
            if rng.randrange(4) == 0:
                continue
            data = rng.randbytes(128 << 10)
            model[off : off + len(data)] = data
            f.seek(off)
            f.write(data)
    return model


def open_fds_to(path: Path) -> list[str]:
    """This process's file descriptors open on ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            continue
    return found


@dataclass
class Run:
    """One migration of a simulated disk with a guest writing meanwhile."""

    tmp: Path
    mode: Mode
    seed: int = 1
    speed: int | None = 48 << 20
    no_cutover: bool = False
    verify: bool = False
    dest: Path | str | None = None  # a str: an NBD URI
    dest_zeroed: bool = True
    guest_io: bool = True
    policy: Policy = FAST
    check_below: int = 0  # resuming: chunks compared with the destination's first
    busy_depth: int = MigrationOptions.busy_depth  # copies while guest I/O is in flight
    dest_timeout: float = MigrationOptions.dest_timeout  # NBD: the longest wait for the server
    on_state: Callable[[MigrationRecord], None] | None = None  # the daemon's record keeper
    source: Path = field(init=False)
    model: bytearray = field(init=False)
    sim: Sim = field(init=False)
    guest: SimGuest = field(init=False)
    target: SimTarget = field(init=False)
    mig: Migration = field(init=False)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.source = self.tmp / "source.img"
        self.model = make_source(self.source, self.seed)
        if self.dest is None:
            self.dest = self.tmp / "dest.img"
        if isinstance(self.dest, Path) and not self.dest.exists():
            sparse_image(self.dest, SIZE)
        self.sim = Sim(self.source, depth=16)
        self.guest = SimGuest(
            self.sim, self.model, seed=self.seed, io=self.guest_io, region=GUEST_REGION
        ).start()
        self.target = SimTarget(self.guest)
        opts = MigrationOptions(
            dest=self.dest, mode=self.mode, chunk_size=chunk_size(self.mode), speed=self.speed,
            no_cutover=self.no_cutover, verify=self.verify, dest_zeroed=self.dest_zeroed,
            delta_dir=self.tmp, resumed=self.check_below > 0, check_below=self.check_below,
            busy_depth=self.busy_depth, dest_timeout=self.dest_timeout,
        )  # fmt: skip
        self.mig = Migration(
            self.target, opts, device="/dev/ublkb-sim", source=str(self.source), size=SIZE,
            io_stats=self.sim.stats, policy=self.policy, on_state=self.on_state,
        )  # fmt: skip

    def run(self, during: Callable[[Run], Any] | None = None, timeout: float = 120) -> Phase:
        """start + run; ``during(self)`` (async) runs alongside, e.g. to cancel."""

        async def main() -> Phase:
            with anyio.fail_after(timeout):
                await self.mig.start()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch)
                    if during is not None:
                        tg.start_soon(during, self)
                    phase = await self.mig.run()
                    tg.cancel_scope.cancel()
                self.statuses.append(self.mig.status())
                return phase

        return anyio.run(main)

    async def _watch(self) -> None:
        while True:
            self.statuses.append(self.mig.status())
            await anyio.sleep(0.02)

    def phases(self) -> list[str]:
        seen: list[str] = []
        for s in self.statuses:
            if not seen or seen[-1] != s["phase"]:
                seen.append(s["phase"])
        return seen

    def stop(self, after_io: float = 0.0) -> None:
        """More guest I/O for ``after_io`` seconds, then stop the guest and close the sim."""
        time.sleep(after_io)
        try:
            self.guest.stop()
        finally:
            self.sim.close()
        assert self.guest.errors == [], self.guest.errors[:5]

    def assert_file_is_model(self, path: Path) -> None:
        data = path.read_bytes()[:SIZE]
        assert len(data) == SIZE
        if data != self.model:
            first = next(i for i in range(SIZE) if data[i] != self.model[i])
            raise AssertionError(f"{path.name} differs from the model at byte {first}")


def phase_events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, str]]:
    out = []
    for line in capsys.readouterr().err.splitlines():
        if "event=migration.phase" not in line:
            continue
        fields = dict(f.split("=", 1) for f in shlex.split(line) if "=" in f)
        out.append(fields)
    return out


# --- every mode, to completion ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_completes_with_guest_io(tmp: Path, mode: Mode, capsys: pytest.CaptureFixture[str]) -> None:
    r = Run(tmp, mode, seed=11)
    phase = r.run()
    status = r.mig.status()
    assert phase is Phase.COMPLETED, status
    done_during = r.guest.counters.completed
    r.stop(after_io=0.2)  # guest I/O after the cutover goes to the destination
    assert r.guest.counters.completed > done_during
    assert done_during > 200, "the guest did I/O during the migration"
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]
    assert not open_fds_to(r.dest), "the sim is gone: nothing holds the destination"  # type: ignore[arg-type]

    assert status["phase"] == "completed" and status["error"] is None
    assert status["bytes_to_copy"] == 0 and status["eta_seconds"] == 0.0
    assert status["chunks_copied"] == status["chunks"] == SIZE // chunk_size(mode)
    assert status["cutover_stall_ms"] is not None
    assert status["cutover_pause_ms"] is not None and status["cutover_pause_ms"] < 5000, status
    assert status["bytes_skipped"] >= 1 << 20, "holes in the source were copied"
    expected = {
        Mode.MIRROR: ["starting", "copying", "cutover", "completed"],
        Mode.DBT: ["starting", "copying", "dirty-passes", "final-pass", "cutover", "completed"],
        Mode.SNAPSHOT: ["starting", "copying", "folding", "final-pass", "cutover", "completed"],
    }[mode]
    events = phase_events(capsys)
    seen = [e["phase"] for e in events]
    # dirty passes / folding are skipped when the first pass left little to do
    assert [p for p in expected if p in seen] == seen, seen
    assert seen[:2] == ["starting", "copying"] and seen[-2:] == ["cutover", "completed"], seen
    for e in events:
        assert e["device"] == "/dev/ublkb-sim" and e["mode"] == mode.value
        for key in ("pass", "cursor", "chunks_copied", "chunks_total", "dirty", "bytes_copied"):
            assert key in e, (key, e)
    # the guest wrote ahead of the copier (the source alone) and behind it
    assert (status["ahead_writes"] > 0) is (mode is not Mode.SNAPSHOT), status
    assert set(status["guest_waits"]) == {"chunk", "destination", "pause"}
    # every mode cuts over without a pause (dbt's and snapshot's tails mirror)
    assert status["final_pause_ms"] is None, status
    assert "pause" not in r.target.calls
    assert status["guest_waits"]["pause"] == 0, status
    if mode is Mode.MIRROR:
        assert status["mirrored_writes"] > 0
    else:
        assert r.target.calls.count("set_mode mirror") == 1  # (its tail)
    if mode is Mode.DBT:
        assert status["tracked_writes"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_old_data_on_the_destination_is_overwritten(tmp: Path, mode: Mode) -> None:
    dest = tmp / "old.img"
    dest.write_bytes(b"\xa5" * SIZE)
    r = Run(tmp, mode, seed=12, dest=dest, dest_zeroed=False, speed=None)
    assert r.run() is Phase.COMPLETED, r.mig.status()
    r.stop()
    r.assert_file_is_model(dest)


def interrupted_copy(tmp: Path, seed: int, junk_chunks: tuple[int, ...]) -> Path:
    """A destination as a migration the daemon's death interrupted may leave it: the first
    half of the chunks copied from what ``Run(seed=seed)`` will serve, some of them since
    overwritten with junk (writes that reached it alone), the second half junk."""
    half = SIZE // 2
    data = bytearray(make_source(tmp / "reference.img", seed))
    (tmp / "reference.img").unlink()
    data[half:] = b"\x5a" * half
    for c in junk_chunks:
        data[c * CHUNK : (c + 1) * CHUNK] = b"\xa5" * CHUNK
    dest = tmp / "interrupted.img"
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("mode", [Mode.MIRROR, Mode.DBT, Mode.AUTO])
def test_resume_writes_only_what_differs(tmp: Path, mode: Mode) -> None:
    """check_below = the first half: those chunks are read back from the destination and
    written only where they differ (the junk ones); the rest is copied.  No guest I/O, so
    the counts are exact."""
    half_chunks = SIZE // CHUNK // 2
    dest = interrupted_copy(tmp, 43, junk_chunks=(3, 77))
    r = Run(tmp, mode, seed=43, dest=dest, dest_zeroed=False, speed=None, guest_io=False,
            check_below=half_chunks)  # fmt: skip
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(dest)
    assert status["resumed"] is True
    assert status["bytes_matched"] == (half_chunks - 2) * CHUNK, status
    assert status["bytes_copied"] == SIZE - status["bytes_matched"], status


@pytest.mark.parametrize("mode", [Mode.MIRROR, Mode.DBT, Mode.AUTO])
def test_resume_with_guest_io(tmp: Path, mode: Mode) -> None:
    """The same with the guest writing all along: the destination ends equal to the model."""
    dest = interrupted_copy(tmp, 44, junk_chunks=(0, 5, 100, 127))
    r = Run(tmp, mode, seed=44, dest=dest, dest_zeroed=False, check_below=SIZE // CHUNK // 2)
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(dest)
    assert status["bytes_matched"] > 0, status


@pytest.mark.parametrize("mode", MODES)
def test_verify_before_cutover(tmp: Path, mode: Mode, capsys: pytest.CaptureFixture[str]) -> None:
    r = Run(tmp, mode, seed=13, verify=True)
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]
    assert status["verify_mismatches"] == 0
    calls = r.target.calls
    assert calls.index("pause") < calls.index("verify") < calls.index("cutover") \
        < calls.index("resume")  # fmt: skip
    if mode is not Mode.MIRROR:  # its tail mirrors before the pause
        assert calls.index("set_mode mirror") < calls.index("pause")
    seen = [e["phase"] for e in phase_events(capsys)]
    assert seen[-3:] == ["verifying", "cutover", "completed"], seen


# --- --no-cutover: in sync until asked ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_no_cutover_waits_for_the_request(tmp: Path, mode: Mode) -> None:
    r = Run(tmp, mode, seed=14, no_cutover=True)
    held: dict[str, Any] = {}

    async def during(run: Run) -> None:
        mig = run.mig
        with pytest.raises(Exception, match="not in sync yet"):
            mig.request_cutover()
        while mig.phase is not Phase.IN_SYNC:
            assert not mig.ended, mig.status()
            await anyio.sleep(0.01)
        passes = mig.status()["pass"]
        await anyio.sleep(0.6)  # stays in sync, the guest writing, for a while
        held["passes"] = mig.status()["pass"] - passes
        held["phase"] = mig.phase
        mig.request_cutover()

    assert r.run(during) is Phase.COMPLETED, r.mig.status()
    r.stop()
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]
    assert held["phase"] is Phase.IN_SYNC
    if mode is Mode.MIRROR:
        assert held["passes"] == 0, "mirror keeps mirroring: no more passes"
    else:
        assert held["passes"] >= 1, "dbt/snapshot keep copying while in sync"
    assert r.phases()[-2:] == ["cutover", "completed"]
    assert "in-sync" in r.phases()


# --- cancel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("when", ["copying", "in-sync"])
def test_cancel_leaves_the_source_authoritative(tmp: Path, mode: Mode, when: str) -> None:
    in_sync = when == "in-sync"
    r = Run(tmp, mode, seed=15, speed=(32 if in_sync else 8) << 20, no_cutover=in_sync)
    seen: dict[str, Any] = {}

    async def during(run: Run) -> None:
        mig = run.mig
        def ready() -> bool:
            if when == "in-sync":
                return mig.phase is Phase.IN_SYNC
            # midway: a quarter into the first pass, or (a guest that writes everything makes
            # a snapshot's first pass short) in the passes that follow it
            if mig.phase is Phase.COPYING:
                return mig.status()["cursor"] >= SIZE / 4
            return mig.phase in (Phase.DIRTY_PASSES, Phase.FOLDING)

        while not ready():
            assert not mig.ended, mig.status()
            await anyio.sleep(0.005)
        seen["cursor"] = mig.status()["cursor"]
        mig.cancel()
        seen["phase"] = mig.phase

    assert r.run(during) is Phase.CANCELLED, r.mig.status()
    assert seen["phase"] is Phase.CANCELLING
    status = r.mig.status()
    assert status["phase"] == "cancelled" and status["error"] is None
    assert not open_fds_to(r.dest), "the destination is closed"  # type: ignore[arg-type]
    if when == "copying":
        assert SIZE / 4 <= seen["cursor"] <= SIZE
    done = r.guest.counters.completed
    r.stop(after_io=0.2)  # the guest goes on, on the source
    assert r.guest.counters.completed > done
    r.assert_file_is_model(r.source)
    assert r.target.calls[-1] == "finish" and "cutover" not in r.target.calls
    with pytest.raises(Exception, match="no migration is running"):
        r.mig.cancel()


def test_cancel_after_cutover_is_refused(tmp: Path) -> None:
    r = Run(tmp, Mode.MIRROR, seed=16, speed=None, policy=Policy(cutover_window=0.5))
    refused: list[str] = []

    async def during(run: Run) -> None:
        while run.mig.phase is not Phase.CUTOVER:
            await anyio.sleep(0.005)
        while "cutover" not in run.target.calls:
            await anyio.sleep(0.005)
        await anyio.sleep(0.1)
        try:
            run.mig.cancel()
        except Exception as e:
            refused.append(str(e))

    assert r.run(during) is Phase.COMPLETED
    r.stop()
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]
    assert refused == [
        "the migration of /dev/ublkb-sim has cut over already: it cannot be cancelled"
    ]


# --- a failing destination ----------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A 2 MiB tmpfs: a 16 MiB destination file on it fills it up (ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="ubm-tiny-", dir="/var/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(d)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)
    d.rmdir()


@pytest.mark.parametrize("mode", MODES)
def test_destination_failure(
    tmp: Path, tiny_tmpfs: Path, mode: Mode, capsys: pytest.CaptureFixture[str]
) -> None:
    r = Run(tmp, mode, seed=17, dest=tiny_tmpfs / "dest.img", speed=None)
    assert r.run() is Phase.FAILED
    status = r.mig.status()
    # ENOSPC, or EIO when the file system took part of a write before it was full (the file
    # backend counts a short write as an I/O error)
    assert status["error"] in (
        "the destination failed: No space left on device (ENOSPC)",
        "the destination failed: Input/output error (EIO)",
    ), status["error"]
    assert not open_fds_to(tiny_tmpfs / "dest.img")
    assert "cutover" not in r.target.calls and r.target.calls[-1] == "finish"
    done = r.guest.counters.completed
    r.stop(after_io=0.2)  # no guest error (checked by stop), the guest goes on
    assert r.guest.counters.completed > done
    r.assert_file_is_model(r.source)
    failed = [e for e in phase_events(capsys) if e["phase"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith("the destination failed: ")
    assert failed[0]["level"] == "error"


def test_pass_error_without_a_recorded_error_fails(tmp: Path) -> None:
    r = Run(tmp, Mode.DBT, seed=18)
    r.target.fail_next["copy_pass"] = native.NativeError("copy_pass", errno.EIO, "copy failed")
    assert r.run() is Phase.FAILED
    r.stop()
    assert r.mig.error == "the copy failed: copy failed"
    r.assert_file_is_model(r.source)


@pytest.mark.parametrize("undo_fails", [False, True], ids=["undone", "undo-fails"])
def test_a_cutover_record_that_cannot_be_saved_leaves_the_source_the_disk(
    tmp: Path, undo_fails: bool
) -> None:
    """The record naming the destination fails (a full state folder): no switch, and the
    record is made to name the source again before the cutover's window closes (if that
    fails too, what the machine would save next says so: the daemon saves the device's
    record as the migration ends), with guest writes going on; the migration fails and the
    source holds every write."""
    saved: list[str | None] = []
    refusals = 2 if undo_fails else 1

    def on_state(rec: MigrationRecord) -> None:
        if (rec.switched or saved[-1:] == ["refused"]) and saved.count("refused") < refusals:
            saved.append("refused")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(rec.cut_over)

    r = Run(tmp, Mode.MIRROR, seed=20, on_state=on_state)
    assert r.run() is Phase.FAILED
    r.stop(after_io=0.2)
    assert r.mig.error is not None and r.mig.error.startswith("the cutover was not made"), \
        r.mig.error  # fmt: skip
    assert r.mig.status()["cutover_pause_ms"] is None, "no switch"
    # the source is the disk: what was saved since says so, and what would be saved next
    after = saved[len(saved) - saved[::-1].index("refused") :]
    assert set(after) == (set() if undo_fails else {None}), saved
    assert not r.mig.resume_state().switched
    r.assert_file_is_model(r.source)


@pytest.mark.parametrize("mode", [Mode.MIRROR, Mode.DBT, Mode.SNAPSHOT])
def test_the_record_is_saved_once_around_the_switch(tmp: Path, mode: Mode) -> None:
    """A save of the record takes tens of milliseconds, and the guest would wait for those
    made while it is paused: no mode pauses it for the switch (dbt's and snapshot's tails
    mirror), and each saves the cutover's record (naming the destination, in the cutover
    phase), then 'done'."""
    saves: list[tuple[bool, str, str | None]] = []
    runs: list[Run] = []

    def on_state(rec: MigrationRecord) -> None:
        saves.append((runs[0].mig.status()["paused"], rec.phase, rec.cut_over))

    runs.append(Run(tmp, mode, seed=21, on_state=on_state))
    r = runs[0]
    assert r.run() is Phase.COMPLETED
    r.stop()
    paused = [(phase, cut) for held, phase, cut in saves if held]
    assert paused == [], saves
    cut = [(held, phase, c) for held, phase, c in saves if c is not None or phase == "cutover"]
    assert cut[:2] == [(False, "cutover", "intent"), (False, "cutover", "done")], saves
    r.assert_file_is_model(r.mig.opts.dest)  # type: ignore[arg-type]


def test_verify_mismatch_fails_without_cutover(tmp: Path) -> None:
    r = Run(tmp, Mode.DBT, seed=19, verify=True)
    r.target.verify = lambda: 3  # type: ignore[method-assign]
    assert r.run() is Phase.FAILED
    r.stop()
    assert r.mig.error == "verification failed: 3 chunks of the destination differ from the disk"
    assert "cutover" not in r.target.calls
    r.assert_file_is_model(r.source)


def test_cutover_refused_then_retried(tmp: Path) -> None:
    r = Run(tmp, Mode.MIRROR, seed=20)
    r.target.fail_next["cutover"] = native.NativeError("cutover", errno.EAGAIN, "not in sync")
    assert r.run() is Phase.COMPLETED
    r.stop()
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]


def test_start_refused(tmp: Path) -> None:
    r = Run(tmp, Mode.MIRROR, dest=tmp / "small.img")
    r.guest.stop()
    r.sim.close()
    # a fresh sim whose destination is too small: the data plane's own check
    (tmp / "small.img").write_bytes(bytes(1 << 20))
    sim = Sim(r.source)
    guest = SimGuest(sim, r.model, io=False).start()
    mig = Migration(SimTarget(guest), MigrationOptions(tmp / "small.img"), device="d",
                    source=str(r.source), size=SIZE)  # fmt: skip
    with pytest.raises(Exception, match="cannot start the migration to .*smaller than the source"):
        anyio.run(mig.start)
    assert mig.phase is Phase.FAILED and mig.ended
    guest.stop()
    sim.close()


# --- speed and status ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("busy_depth", "guest_io", "yields"), [(1, True, True), (0, True, False), (1, False, False)]
)
def test_copier_yields_to_guest_io(
    tmp: Path, busy_depth: int, guest_io: bool, yields: bool
) -> None:
    """While guest requests are in flight the copier copies busy_depth chunks at a time, not
    its full depth, rests between bursts (pacer.c), and counts the time it held back; with
    busy_depth 0 it never does, and nor does it without guest I/O."""
    r = Run(tmp, Mode.MIRROR, seed=22, speed=None, guest_io=guest_io, busy_depth=busy_depth)
    assert r.run() is Phase.COMPLETED
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]
    assert status["busy_depth"] == busy_depth
    if yields:
        # the guest's requests were in flight through much of the copy
        assert status["yielded_seconds"] > 0.25 * status["cutover_after"], status
    else:
        assert status["yielded_seconds"] == 0, status


def test_speed_limit_and_status(tmp: Path) -> None:
    r = Run(tmp, Mode.MIRROR, seed=21, speed=4 << 20, guest_io=False)
    seen: dict[str, Any] = {}

    async def during(run: Run) -> None:
        mig = run.mig
        await anyio.sleep(0.8)
        seen["slow"] = mig.status()
        mig.set_speed(None)  # lift the limit: it finishes quickly
        seen["lifted"] = time.monotonic()

    t0 = time.monotonic()
    assert r.run(during) is Phase.COMPLETED
    r.stop()
    slow = seen["slow"]
    assert slow["phase"] == "copying" and slow["pass"] == 1 and slow["pass_kind"] == "all"
    assert slow["speed"] == 4 << 20
    assert 1 << 20 < slow["rate"] < 8 << 20, slow["rate"]  # about the limit
    assert slow["eta_seconds"] is not None and slow["eta_seconds"] > 0
    assert 0 < slow["cursor"] < SIZE and slow["cursor"] % CHUNK == 0
    assert slow["bytes_to_copy"] == SIZE - slow["chunks_copied"] * CHUNK
    assert slow["elapsed"] >= 0.7
    for key in ("reads", "writes", "parked", "inflight"):
        assert key in slow["io"]
    assert time.monotonic() - t0 < 2.5 + FAST.cutover_window
    json.dumps(r.mig.status())  # the status is JSON as is
    end = r.mig.status()
    # the migration's time runs to the cutover; elapsed also counts the stall window after
    assert 0.7 < end["cutover_after"] <= end["elapsed"] - FAST.cutover_window, end
    r.assert_file_is_model(r.dest)  # type: ignore[arg-type]
    assert r.mig.status()["io"] == {}, "no guest I/O counters once the sim is gone"


