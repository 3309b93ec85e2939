"""The migration policy's decisions, against a scripted target (no data plane): which passes run
and when, when to mirror the tail, pause (--verify), cut over, give up; cancel and abort races;
speed changes.
The real data plane is driven in test_migration.py."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from ublkmig import native
from ublkmig.migration import Migration, MigrationOptions, Mode, Phase, Policy
from ublkmig.native import MigStats, Pass

CHUNKS = 1000
CHUNK = 1 << 20
FAST = Policy(sample_interval=0.01, cutover_window=0.01, in_sync_dirty_interval=0.01,
              in_sync_fold_interval=0.01)  # fmt: skip


class ScriptedTarget:
    """A MigrationTarget whose dirty (or delta) count after each pass comes from a script."""

    def __init__(
        self,
        mode: Mode,
        after_pass: list[int] | Callable[[int], int],
        *,
        delta_after_new: int = 0,
        max_deltas: int = 8,
    ) -> None:
        self.mode = mode
        self.after_pass = after_pass
        self.delta_after_new = delta_after_new
        self.max_deltas = max_deltas
        self.calls: list[str] = []
        self.speeds: list[int] = []
        self.lock = threading.Lock()
        self.s = MigStats(
            size=CHUNKS * CHUNK, chunk_size=CHUNK, nr_chunks=CHUNKS, mode=int(mode.native)
        )
        self.npass = 0
        self.error = 0
        self.aborted = threading.Event()
        self.block_pass: threading.Event | None = None  # set: copy_pass waits for an abort
        self.ignore_aborts = 0  # aborts lost (as when a pass starts right after one)
        self.fail_cutover: list[int] = []  # errnos the next cutovers return
        self.verify_result = 0
        self.finished = False
        self.in_tail = False  # dbt, snapshot: set_mode(MIRROR), their tail
        self.tail: list[int] = []  # dirty chunks after each pass of dbt's or snapshot's tail

    def _set(self, **kw: Any) -> None:
        with self.lock:
            self.s = replace(self.s, **kw)

    def mig_start(self, config: native.MigrationConfig) -> None:
        self.calls.append("mig_start")
        self._set(generation=1 if self.mode is Mode.SNAPSHOT else 0)

    def copy_pass(self, kind: Pass) -> int:
        assert not self.finished
        self.calls.append(kind.label)
        if self.block_pass is not None:
            self.aborted.clear()
            while True:
                if self.aborted.wait(5):
                    if self.ignore_aborts:
                        self.ignore_aborts -= 1
                        self.aborted.clear()
                        continue
                    raise native.NativeError("copy_pass", errno.ECANCELED, "the pass was aborted")
                raise AssertionError("never aborted")
        script = self.after_pass
        n = script(self.npass) if callable(script) else script[min(self.npass, len(script) - 1)]
        self.npass += 1
        if kind is Pass.FINAL:
            n = 0
        elif self.in_tail:  # writes mirrored
            n = self.tail.pop(0) if self.tail else 0
        snapshot_fold = self.mode is Mode.SNAPSHOT and kind is not Pass.FINAL and not self.in_tail
        field = "delta_chunks" if snapshot_fold else "dirty_chunks"
        self._set(
            chunks_copied=CHUNKS,
            cursor=CHUNKS,
            passes=self.s.passes + 1,
            bytes_copied=self.s.bytes_copied + CHUNK,
            error=self.error,
            **{field: n},
        )
        if kind is Pass.FINAL:
            self._set(dirty_chunks=0, delta_chunks=0)
        if self.error:
            raise native.NativeError("copy_pass", -self.error, "copy failed")
        return n

    def set_speed(self, bytes_per_second: int) -> None:
        self.speeds.append(bytes_per_second)

    def new_delta(self) -> None:
        self.calls.append("new_delta")
        if self.s.generation >= self.max_deltas:
            raise native.NativeError("new_delta", errno.ENOSPC, "all deltas are in use")
        self._set(generation=self.s.generation + 1, delta_chunks=self.delta_after_new)

    def set_mode(self, mode: native.MigMode) -> None:
        self.calls.append(f"set_mode {mode.name.lower()}")
        self.in_tail = self.mode in (Mode.DBT, Mode.SNAPSHOT) and mode is native.MigMode.MIRROR
        if self.in_tail and self.mode is Mode.SNAPSHOT:  # the active delta's chunks are dirty
            self._set(dirty_chunks=self.s.delta_chunks)

    def reconnect(self) -> None:
        self.calls.append("reconnect")
        self._set(dest_down=0)

    def pause(self) -> None:
        self.calls.append("pause")
        self._set(paused=1)

    def resume(self) -> None:
        self.calls.append("resume")
        self._set(paused=0, last_pause_ns=2_000_000)

    def cutover(
        self,
        record: Callable[[], None] | None = None,
        unrecord: Callable[[], None] | None = None,
    ) -> None:
        self.calls.append("cutover")
        if self.fail_cutover:
            err = self.fail_cutover.pop(0)
            if err == errno.EPIPE:  # the destination's connection lost
                self._set(dest_down=1)
            raise native.NativeError("cutover", err, "not in sync" if err == errno.EAGAIN else "x")
        if record is not None:
            record()
        self._set(cut_over=1, cutover_latency_ns=300_000)

    def verify(self) -> int:
        self.calls.append("verify")
        return self.verify_result

    def abort(self) -> None:
        assert not self.finished, "abort after finish"
        self.aborted.set()

    def finish(self) -> None:
        self.calls.append("finish")
        self.finished = True

    def stats(self) -> MigStats:
        assert not self.finished, "get_stats after finish"
        with self.lock:
            return self.s


def run(
    target: ScriptedTarget,
    mode: Mode,
    during: Callable[[Migration], Any] | None = None,
    policy: Policy = FAST,
    **opts: Any,
) -> Migration:
    mig = Migration(target, MigrationOptions(Path("/dest"), mode, **opts), device="/dev/ublkb9",
                    source="/src", size=CHUNKS * CHUNK, policy=policy)  # fmt: skip

    async def main() -> None:
        with anyio.fail_after(30):
            await mig.start()
            async with anyio.create_task_group() as tg:
                if during is not None:
                    tg.start_soon(during, mig)
                await mig.run()
                tg.cancel_scope.cancel()

    anyio.run(main)
    return mig


def passes(target: ScriptedTarget) -> list[str]:
    return [c for c in target.calls if c != "mig_start"]


def test_mirror_one_pass_no_pause() -> None:
    t = ScriptedTarget(Mode.MIRROR, [0])
    mig = run(t, Mode.MIRROR)
    assert mig.phase is Phase.COMPLETED
    assert passes(t) == ["all", "cutover", "finish"]
    assert mig.status()["cutover_stall_ms"] == 0.3 and mig.status()["final_pause_ms"] is None
    assert mig.status()["cutover_pause_ms"] == 0.0  # mirror mode holds nothing


def test_mirror_dirty_chunks_after_the_pass_are_copied_again_then_fail() -> None:
    t = ScriptedTarget(Mode.MIRROR, [5, 0])
    assert run(t, Mode.MIRROR).phase is Phase.COMPLETED
    assert passes(t) == ["all", "all", "cutover", "finish"]
    t = ScriptedTarget(Mode.MIRROR, [5])
    mig = run(t, Mode.MIRROR)
    assert mig.phase is Phase.FAILED
    assert mig.error == "the mirror did not converge: 5 chunks still dirty"
    assert "cutover" not in t.calls and t.calls[-1] == "finish"


def test_mirror_verify_pauses() -> None:
    t = ScriptedTarget(Mode.MIRROR, [0])
    mig = run(t, Mode.MIRROR, verify=True)
    assert mig.phase is Phase.COMPLETED
    assert passes(t) == ["all", "pause", "verify", "cutover", "resume", "finish"]
    assert mig.final_pause_ns == 2_000_000


def test_dbt_converges() -> None:
    t = ScriptedTarget(Mode.DBT, [100, 60, 30, 10])
    mig = run(t, Mode.DBT, speed=1 << 20)
    assert mig.phase is Phase.COMPLETED
    # then the writes mirrored, the last dirty chunks copied and the cutover made in a
    # window, the guest never paused
    assert passes(t) == ["all", "dirty", "dirty", "dirty", "set_mode mirror", "all", "cutover",
                         "finish"]  # fmt: skip
    assert t.speeds == [], "the mirrored final pass keeps the speed asked for"
    assert mig.status()["final_pause_ms"] is None


def test_dbt_tail_passes_until_clean() -> None:
    """A write routed before the switch to mirroring dirties its chunk when it is done: a
    pass after it copies it; one still dirty after three passes means a destination error."""
    t = ScriptedTarget(Mode.DBT, [100, 10])
    t.tail = [2]
    assert run(t, Mode.DBT).phase is Phase.COMPLETED
    assert passes(t) == ["all", "dirty", "set_mode mirror", "all", "all", "cutover", "finish"]
    t = ScriptedTarget(Mode.DBT, [100, 10])
    t.tail = [2, 2, 2]
    mig = run(t, Mode.DBT)
    assert mig.phase is Phase.FAILED, "never paused to force it"
    assert mig.error == "the mirror did not converge: 2 chunks still dirty"
    assert "pause" not in t.calls and "cutover" not in t.calls


def test_dbt_stops_when_not_shrinking() -> None:
    t = ScriptedTarget(Mode.DBT, [100, 90, 95, 97, 50, 10])
    assert run(t, Mode.DBT).phase is Phase.COMPLETED
    assert passes(t)[:5] == ["all", "dirty", "dirty", "dirty", "set_mode mirror"]


def test_dbt_pass_limit() -> None:
    t = ScriptedTarget(Mode.DBT, lambda n: 1000 - n)
    assert run(t, Mode.DBT, policy=replace(FAST, max_dirty_passes=4)).phase is Phase.COMPLETED
    assert passes(t)[:6] == ["all", "dirty", "dirty", "dirty", "dirty", "set_mode mirror"]


def test_dbt_nothing_dirty_goes_straight_to_the_final_pass() -> None:
    t = ScriptedTarget(Mode.DBT, [3])
    assert run(t, Mode.DBT).phase is Phase.COMPLETED
    assert passes(t) == ["all", "set_mode mirror", "all", "cutover", "finish"]


def test_dbt_verify_pauses_after_its_tail() -> None:
    t = ScriptedTarget(Mode.DBT, [3])
    mig = run(t, Mode.DBT, verify=True)
    assert mig.phase is Phase.COMPLETED
    assert passes(t) == ["all", "set_mode mirror", "all", "pause", "verify", "cutover", "resume",
                         "finish"]  # fmt: skip
    assert mig.final_pause_ns == 2_000_000


def test_snapshot_folds_until_small() -> None:
    t = ScriptedTarget(Mode.SNAPSHOT, [200, 100, 40, 5], delta_after_new=0)
    mig = run(t, Mode.SNAPSHOT)
    assert mig.phase is Phase.COMPLETED
    # then the writes mirrored, the active delta copied, the cutover made: no pause
    assert passes(t) == ["all", "new_delta", "all", "new_delta", "all", "new_delta", "all",
                         "set_mode mirror", "all", "cutover", "finish"]  # fmt: skip
    assert mig.final_pause_ns is None


def test_snapshot_generation_limit_and_no_more_deltas() -> None:
    t = ScriptedTarget(Mode.SNAPSHOT, lambda n: 1000 - n)
    run(t, Mode.SNAPSHOT, policy=replace(FAST, max_generations=3))
    assert t.calls.count("new_delta") == 3
    t = ScriptedTarget(Mode.SNAPSHOT, lambda n: 1000 - n, max_deltas=2)
    mig = run(t, Mode.SNAPSHOT)
    assert mig.phase is Phase.COMPLETED
    assert passes(t)[:5] == ["all", "new_delta", "all", "new_delta", "set_mode mirror"]


def test_snapshot_in_sync_stops_folding_when_out_of_deltas() -> None:
    t = ScriptedTarget(Mode.SNAPSHOT, [200, 5], delta_after_new=50, max_deltas=3)

    async def during(mig: Migration) -> None:
        while mig.phase is not Phase.IN_SYNC:
            await anyio.sleep(0.005)
        await anyio.sleep(0.2)
        mig.request_cutover()

    assert run(t, Mode.SNAPSHOT, during, no_cutover=True).phase is Phase.COMPLETED
    assert t.calls.count("new_delta") == 3, "asked once more, then no more"


def test_destination_error_fails() -> None:
    t = ScriptedTarget(Mode.DBT, [100])
    t.error = -errno.EIO
    mig = run(t, Mode.DBT)
    assert mig.phase is Phase.FAILED
    assert mig.error == "the destination failed: Input/output error (EIO)"
    assert passes(t) == ["all", "finish"]


def test_error_while_in_sync_fails() -> None:
    t = ScriptedTarget(Mode.MIRROR, [0])

    async def during(mig: Migration) -> None:
        while mig.phase is not Phase.IN_SYNC:
            await anyio.sleep(0.005)
        t._set(error=-errno.ENOSPC)

    mig = run(t, Mode.MIRROR, during, no_cutover=True)
    assert mig.phase is Phase.FAILED
    assert mig.error == "the destination failed: No space left on device (ENOSPC)"
    assert "cutover" not in t.calls


def test_cutover_eagain_copies_again_other_errors_fail() -> None:
    t = ScriptedTarget(Mode.DBT, [0])
    t.fail_cutover = [errno.EAGAIN]
    assert run(t, Mode.DBT).phase is Phase.COMPLETED
    # dbt mirrors from its final pass on: a refused cutover is followed by a pass, unpaused
    assert passes(t) == ["all", "set_mode mirror", "cutover", "all", "cutover", "finish"]
    t = ScriptedTarget(Mode.SNAPSHOT, [0])
    t.fail_cutover = [errno.EAGAIN]
    assert run(t, Mode.SNAPSHOT).phase is Phase.COMPLETED
    assert passes(t) == ["all", "set_mode mirror", "cutover", "all", "cutover", "finish"]
    t = ScriptedTarget(Mode.MIRROR, [0])
    t.fail_cutover = [errno.EIO]
    mig = run(t, Mode.MIRROR)
    assert mig.phase is Phase.FAILED and mig.error == "the cutover failed: x"
    t = ScriptedTarget(Mode.MIRROR, [0])
    t.fail_cutover = [errno.EAGAIN] * 10
    mig = run(t, Mode.MIRROR)
    assert mig.error == "the cutover failed: not in sync after 5 tries"


def test_tail_stops_mirroring_after_losing_the_destination_at_its_cutover() -> None:
    """DBT and snapshot mirror in their tail; when the destination's connection is lost at
    the cutover, they go back to their own way while they dial again, and start over."""
    t = ScriptedTarget(Mode.DBT, [0])
    t.fail_cutover = [errno.EPIPE]
    assert run(t, Mode.DBT).phase is Phase.COMPLETED
    assert passes(t) == ["all", "set_mode mirror", "cutover", "set_mode dbt", "reconnect",
                         "all", "set_mode mirror", "cutover", "finish"]  # fmt: skip
    # snapshot alike: its writes go to the active delta alone again
    t = ScriptedTarget(Mode.SNAPSHOT, [0])
    t.fail_cutover = [errno.EPIPE]
    assert run(t, Mode.SNAPSHOT).phase is Phase.COMPLETED
    assert passes(t) == ["all", "set_mode mirror", "cutover", "set_mode snapshot", "reconnect",
                         "all", "set_mode mirror", "cutover", "finish"]  # fmt: skip


def test_verify_mismatch_fails() -> None:
    t = ScriptedTarget(Mode.SNAPSHOT, [0])
    t.verify_result = 2
    mig = run(t, Mode.SNAPSHOT, verify=True)
    assert mig.phase is Phase.FAILED and mig.verify_mismatches == 2
    assert passes(t) == ["all", "set_mode mirror", "pause", "verify", "finish"]


@pytest.fixture
def blocking() -> Iterator[ScriptedTarget]:
    t = ScriptedTarget(Mode.DBT, [100])
    t.block_pass = threading.Event()
    yield t


@pytest.mark.parametrize("lost", [0, 3])
def test_cancel_aborts_the_running_pass(blocking: ScriptedTarget, lost: int) -> None:
    blocking.ignore_aborts = lost

    async def during(mig: Migration) -> None:
        while not mig.status()["passing"]:
            await anyio.sleep(0.005)
        with pytest.raises(Exception, match="not in sync yet"):
            mig.request_cutover()
        mig.cancel()
        assert mig.phase is Phase.CANCELLING
        mig.cancel()  # twice is fine

    t0 = time.monotonic()
    mig = run(blocking, Mode.DBT, during)
    assert mig.phase is Phase.CANCELLED and mig.error is None
    assert passes(blocking) == ["all", "finish"]
    assert time.monotonic() - t0 < 2, "aborts are repeated until the pass returns"


def test_cancel_while_in_sync() -> None:
    t = ScriptedTarget(Mode.DBT, [0])

    async def during(mig: Migration) -> None:
        while mig.phase is not Phase.IN_SYNC:
            await anyio.sleep(0.005)
        await anyio.sleep(0.05)
        mig.cancel()

    mig = run(t, Mode.DBT, during, no_cutover=True)
    assert mig.phase is Phase.CANCELLED
    assert "cutover" not in t.calls and t.calls[-1] == "finish"


def test_outside_cancellation_still_finishes() -> None:
    """The daemon's task group cancelled under the migration: it still lets go cleanly."""
    t = ScriptedTarget(Mode.DBT, [100])
    t.block_pass = threading.Event()
    mig = Migration(t, MigrationOptions(Path("/dest"), Mode.DBT), device="/dev/ublkb9",
                    source="/src", size=CHUNKS * CHUNK, policy=FAST)  # fmt: skip

    async def main() -> None:
        await mig.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(mig.run)
            while not mig.status()["passing"]:
                await anyio.sleep(0.005)
            await anyio.sleep(0.05)  # the pass is waiting
            t.aborted.set()  # the pass ends (as aborted) ...
            tg.cancel_scope.cancel()  # ... while the task group is cancelled

    anyio.run(main)
    assert mig.phase is Phase.CANCELLED and t.calls[-1] == "finish"


def test_status_fields() -> None:
    t = ScriptedTarget(Mode.DBT, [100])
    t.block_pass = threading.Event()
    seen: dict[str, Any] = {}

    async def during(mig: Migration) -> None:
        while not mig.status()["passing"]:
            await anyio.sleep(0.005)
        t._set(chunks_copied=250, cursor=300, dirty_chunks=50, bytes_copied=250 * CHUNK)
        seen.update(mig.status())
        mig.cancel()

    run(t, Mode.DBT, during, speed=7 << 20)
    assert seen["phase"] == "copying" and seen["pass"] == 1 and seen["pass_kind"] == "all"
    assert seen["cursor"] == 300 * CHUNK and seen["chunk_size"] == CHUNK
    assert seen["bytes_to_copy"] == (750 + 50) * CHUNK
    assert seen["speed"] == 7 << 20 and seen["mode"] == "dbt"
    assert seen["source"] == "/src" and seen["dest"] == "/dest"
    assert seen["cutover_after"] is None  # not cut over yet
    assert set(seen) >= {"rate", "eta_seconds", "elapsed", "dirty_chunks", "hot_chunks",
                         "generation", "delta_chunks", "io", "error", "final_pause_ms",
                         "cutover_stall_ms", "max_latency_ms", "size"}  # fmt: skip


def test_speed_changes_apply_unless_paused() -> None:
    t = ScriptedTarget(Mode.DBT, [0])
    t.block_pass = threading.Event()

    async def during(mig: Migration) -> None:
        while not mig.status()["passing"]:
            await anyio.sleep(0.005)
        mig.set_speed(5 << 20)
        mig.set_speed(None)
        with pytest.raises(Exception, match="speed must be more than 0"):
            mig.set_speed(0)
        mig.cancel()

    mig = run(t, Mode.DBT, during, speed=1 << 20)
    assert t.speeds == [5 << 20, 0]
    with pytest.raises(Exception, match="no migration is running on /dev/ublkb9"):
        mig.set_speed(1)
