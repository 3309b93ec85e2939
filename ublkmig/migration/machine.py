"""The state machine of one migration, at chunk-pass granularity.

The data plane (native/) routes every guest request and copies chunks; this machine
decides which passes to run, when the copy is in sync, when to pause guest I/O, when to cut
over, and when to give up (the knobs and auto mode's decisions: policy.py).  It runs as one
anyio task inside the ``serve`` daemon (and, in host tests, against the simulator); every
blocking data-plane call runs in a worker thread.

State machine (one ``migration.phase`` log event per change)::

    starting ─► copying ─┬─ mirror ──────────────────────────────┐
     (mig_start) (PASS_ALL)├─ auto ──► [tracked: dirty-passes]*──┤
                          ├─ dbt ──► dirty-passes (PASS_DIRTY)*──┤
                          └─ snapshot ► folding (new_delta+ALL)*─┤
                                                                 ▼
                          [--no-cutover: in-sync, until `cutover`]
                                                                 ▼
      final-pass (dbt, snapshot: the writes mirrored, PASS_ALL until clean)
                                                                 ▼
                                                verifying (--verify, paused)
                                                                 ▼
                   cutover (in its window, no pause; the stall measured)
                                                                 ▼
                                                        completed (finish)

    any phase before the cutover ── cancel ──► cancelling ─► cancelled (abort, finish)
    any phase before the cutover ── destination error / verify mismatch ─► failed (finish)
    any phase before the cutover ── NBD connections lost ─► reconnecting ─► copying, or failed

After ``completed`` the device serves from the destination; after
``cancelled`` or ``failed`` it serves from the source, which the migration
never wrote (in snapshot mode ``finish`` folds the deltas back into it).
"""

from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

from ublkmig import native
from ublkmig.errors import UserError
from ublkmig.migration import record
from ublkmig.migration.options import MigrationOptions, Mode, check_speed
from ublkmig.migration.phase import ENDED, SYNCING, Phase
from ublkmig.migration.policy import Auto, Policy, Stall, Switch, in_sync
from ublkmig.migration.status import ms, report
from ublkmig.migration.steps import MigrationTarget, Steps, _Cancelled, _Failed
from ublkmig.native import MigStats, Pass


class Migration(Steps):
    """One migration of one device: ``await start()`` (mig_start; UserError if refused), then
    ``await run()`` until it ends.  cancel(), request_cutover(), set_speed() and status() are
    called from the same event loop at any time.  (The calls into the data plane: Steps.)
    """

    def __init__(
        self,
        target: MigrationTarget,
        opts: MigrationOptions,
        *,
        device: str,
        source: str,
        size: int,
        io_stats: Callable[[], dict[str, int]] | None = None,
        policy: Policy | None = None,
        on_state: Callable[[record.MigrationRecord], None] | None = None,
    ) -> None:
        self.policy = policy or Policy()
        super().__init__(target, opts, device=device, source=source, size=size,
                         rate_window=self.policy.rate_window)  # fmt: skip
        self.size = size
        self.io_stats = io_stats
        # persists resume_state() (the daemon's on_state: ublkmig.state)
        self.recorder = record.Recorder(on_state, device=device, log=self.log)
        self.phase = Phase.STARTING
        self.error: str | None = None
        self.speed = opts.speed
        self._cancel_reason = ""
        self._cutover_requested = anyio.Event()
        self._done = anyio.Event()
        self._wakeup = anyio.Event()
        self.cutover_stall_ns: int | None = None
        self.verify_mismatches: int | None = None
        self.reconnects = 0  # times the destination's lost connections were restored
        # how guest writes go (auto mode: its switches, decided there)
        self.auto = Auto(self.policy, opts.fallback_wait_ms,
                         writes_mirrored=opts.mode not in (Mode.DBT, Mode.SNAPSHOT))  # fmt: skip
        # the cutover's record: "intent" (in sync, switching), "done" (switched)
        self._cutting_over: str | None = None

    # --- requests (event loop) ----------------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.phase in ENDED

    @property
    def _cut_over(self) -> bool:
        """The device serves the destination now."""
        return self._cutting_over == "done"

    @property
    def in_sync(self) -> bool:
        return self.phase is Phase.IN_SYNC

    @property
    def fallbacks(self) -> int:
        """Auto mode's fallbacks to dirty tracking so far (as in status)."""
        return self.auto.fallbacks

    def cancel(self, reason: str = "request") -> None:
        """Stop before the cutover; the source stays authoritative.  UserError once cut over."""
        self._check_running()
        if self._cut_over:
            raise UserError(
                f"the migration of {self.device} has cut over already: it cannot be cancelled"
            )
        if self._cancel.is_set():
            return
        self._cancel_reason = reason
        self._cancel.set()
        self._wakeup.set()
        self._set_phase(Phase.CANCELLING, reason=reason)
        self._abort()

    def request_cutover(self) -> None:
        """With --no-cutover: switch now (UserError unless in sync)."""
        self._check_running()
        if self.phase in SYNCING:
            s = self.progress.last
            raise UserError(
                f"not in sync yet: {self.device} is {self.phase} "
                f"({s.chunks_copied} of {s.nr_chunks} chunks copied, {s.dirty_chunks} dirty)"
            )
        if self.phase is Phase.CANCELLING:
            raise UserError(f"the migration of {self.device} is being cancelled")
        self._cutover_requested.set()  # in-sync: go; final-pass and later: already going
        self._wakeup.set()

    def set_speed(self, bytes_per_second: int | None) -> None:
        check_speed(bytes_per_second)
        self._check_running()
        self.speed = bytes_per_second
        self._apply_speed(bytes_per_second or 0)
        self.log.info("migration.speed", device=self.device, speed=bytes_per_second or "unlimited")

    def _check_running(self) -> None:
        if self.ended:
            said = {Phase.CANCELLED: "was cancelled"}.get(self.phase, str(self.phase))
            raise UserError(f"no migration is running on {self.device} (the last one {said})")

    async def wait(self) -> Phase:
        await self._done.wait()
        return self.phase

    # --- status, phases, the record -----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._stats()
        return report(
            self.progress, self.opts, self.auto, device=self.device, source=self.source,
            phase=self.phase, pass_no=self._pass_no, pass_kind=self._pass_kind,
            passing=self._passing, paused=self._paused, cut_over=self._cut_over,
            speed=self.speed, reconnects=self.reconnects, verify_mismatches=self.verify_mismatches,
            cutover_stall_ns=self.cutover_stall_ns, final_pause_ns=self.final_pause_ns,
            error=self.error, io=self._io(),
        )  # fmt: skip

    def _io(self) -> dict[str, int]:
        """The device's guest I/O counters ({} if it is gone)."""
        if self.io_stats is None:
            return {}
        try:
            return self.io_stats()
        except native.NativeError:
            return {}

    def _set_phase(self, phase: Phase, save: bool = True, **extra: Any) -> None:
        """Enter ``phase``: logged, and saved in the record unless it ends the migration or
        ``save`` is False (the caller saves it soon after)."""
        if self.phase is Phase.CANCELLING and phase not in ENDED:
            return  # the step that was starting will notice the cancel
        self.phase = phase
        s = self._stats()
        if phase in ENDED:
            self.progress.ended_at = time.monotonic()
        fields: dict[str, Any] = {
            "device": self.device,
            "mode": str(self.opts.mode),
            "phase": str(phase),
            "pass": self._pass_no,
            "cursor": self.progress.cursor(),
            "chunks_copied": s.chunks_copied,
            "chunks_total": s.nr_chunks,
            "dirty": s.dirty_chunks,
            "bytes_copied": s.bytes_copied,
        }
        if self.opts.mode is Mode.SNAPSHOT:
            fields.update(generation=s.generation, delta_chunks=s.delta_chunks)
        fields.update((k, v) for k, v in extra.items() if v is not None)
        if phase is Phase.FAILED:
            self.log.error("migration.phase", error=self.error, **fields)
        else:
            self.log.info("migration.phase", **fields)
        if phase not in ENDED and save:
            self._persist()

    def resume_state(self) -> record.MigrationRecord:
        """What ``--resume`` needs to go on after the daemon died (record.resume_state)."""
        return record.resume_state(
            self.opts, device=self.device, source=self.source, speed=self.speed,
            phase=self.phase, reach=self.progress.reach, chunks=self.progress.last.nr_chunks,
            cut_over=self._cutting_over,
        )  # fmt: skip

    def _persist(self, strict: bool = False) -> None:
        """Save resume_state() (record.Recorder.save: a failure only logged unless strict)."""
        self.recorder.save(self.resume_state, strict=strict)

    # --- the state machine --------------------------------------------------------------------
    async def start(self) -> None:
        """Open the destination and route guest I/O through the migration (ubm_mig_start)."""
        o = self.opts
        self._set_phase(
            Phase.STARTING, source=self.source, dest=str(o.dest), size=self.size,
            chunk_size=o.chunk_size, speed=o.speed or "unlimited", busy_depth=o.busy_depth,
            no_cutover=o.no_cutover,
            verify=o.verify, dest_zeroed=o.dest_zeroed,
            resumed_below=o.check_below if o.resumed else None,
        )  # fmt: skip
        # shielded: a start that succeeds must be known to have (a cancellation arriving while
        # the worker thread runs would otherwise leave the data plane's migration running)
        with anyio.CancelScope(shield=True):
            try:
                config = o.native_config(self.source)
                await anyio.to_thread.run_sync(self.target.mig_start, config)
            except native.NativeError as e:
                self.error = f"cannot start the migration to {o.dest}: {e.detail}"
                self._set_phase(Phase.FAILED)
                self._done.set()
                raise UserError(self.error) from None
            self._live = True
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:  # cancelled meanwhile (the daemon going away): let go again
            await self._end(Phase.CANCELLED)
            self._done.set()
            raise
        self.progress.started = time.monotonic()
        self._stats()

    async def run(self) -> Phase:
        """Drive the migration until it ends; returns the final phase (never raises for a
        failed or cancelled migration)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sampler)
                try:
                    await self._run()
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._done.set()
        return self.phase

    async def _run(self) -> None:
        try:
            await self._drive()
        except _Cancelled:
            await self._end(Phase.CANCELLED)
        except _Failed as e:
            self.error = str(e)
            await self._end(Phase.FAILED)
        except BaseException as e:  # cancelled from outside (daemon going away), or a bug
            with anyio.CancelScope(shield=True):
                if self._cut_over:
                    await self._finish_completed()
                else:
                    if not isinstance(e, anyio.get_cancelled_exc_class()):
                        self.error = f"internal error: {e!r}"
                        self.log.exception("migration.crashed", device=self.device)
                    await self._end(Phase.FAILED if self.error else Phase.CANCELLED)
            raise
        else:
            await self._finish_completed()

    async def _drive(self) -> None:
        """The passes and the switch; after losing connections to the destination (NBD),
        dial again and start over from a full pass (it copies what is not copied yet, and
        the chunks whose writes were lost, which went dirty)."""
        while True:
            try:
                await self._drive_once()
                return
            except _Failed as e:
                if self._cut_over or not self._stats().dest_down:
                    raise
                await self._reconnect(str(e))

    async def _reconnect(self, why: str) -> None:
        """Dial the destination again, with a doubling wait, within the policy's budget
        (_Failed past it).  Guest I/O goes on meanwhile (on the source; writes to copied
        chunks dirty them)."""
        p = self.policy
        await self._resume()  # a lost destination must not hold up the guest
        if self.opts.mode is Mode.AUTO:
            # track the guest's writes on the source while it is away
            self._switch_writes(self.auto.destination_lost())
        elif self.opts.mode in (Mode.DBT, Mode.SNAPSHOT):
            # lost in its mirrored tail (_mirror_tail): stop mirroring, as its mode says
            self.target.set_mode(self.opts.mode.native)
        self.log.warning("migration.destination_lost", device=self.device, error=why,
                         dest=str(self.opts.dest))  # fmt: skip
        self._set_phase(Phase.RECONNECTING, error=why)
        t0 = time.monotonic()
        delay = p.reconnect_delay
        for attempt in itertools.count(1):
            with anyio.move_on_after(delay):
                await self._cancel.wait()
            self._check_cancel()
            try:
                await anyio.to_thread.run_sync(self.target.reconnect)
            except native.NativeError as e:
                waited = time.monotonic() - t0
                self.log.info("migration.reconnect_failed", device=self.device, attempt=attempt,
                              why=e.detail)  # fmt: skip
                if waited + delay > p.reconnect_budget:
                    raise _Failed(f"{why}; it did not come back within "
                                  f"{p.reconnect_budget:g} s ({e.detail})") from None
                delay = min(delay * 2, p.reconnect_max_delay)
                continue
            self.reconnects += 1
            self.log.info("migration.reconnected", device=self.device, attempt=attempt,
                          after=round(time.monotonic() - t0, 3), reconnects=self.reconnects)
            return

    async def _drive_once(self) -> None:
        self._check_cancel()
        self._set_phase(Phase.COPYING)
        await self._pass(Pass.ALL)
        if self.opts.mode is Mode.AUTO:
            await self._converge_auto()
        elif self.opts.mode is Mode.MIRROR:
            await self._converge_mirror()
        elif self.opts.mode is Mode.DBT:
            await self._converge_dbt()
        else:
            await self._converge_snapshot()
        if self.opts.no_cutover:
            await self._hold_in_sync()
        await self._switch()

    async def _converge_mirror(self) -> None:
        """One pass suffices; a chunk left dirty means a destination error (mirrored writes that
        failed there), so fail.  Retry a pass only when dirty without a recorded error."""
        for _ in range(3):
            if in_sync(self._checked_stats()):
                return
            await self._pass(Pass.ALL)
        s = self._checked_stats()
        raise _Failed(f"the mirror did not converge: {s.dirty_chunks} chunks still dirty")

    async def _converge_auto(self) -> None:
        """Passes until the writes are mirrored again and nothing is dirty: then the
        cutover needs no pause.  (The sampler switches modes meanwhile; past the fallback
        limit it mirrors for good, so this ends.)"""
        while True:
            s = self._checked_stats()
            if self.auto.converged(s):
                return
            if not self.auto.writes_mirrored and self.phase is not Phase.DIRTY_PASSES:
                self._set_phase(Phase.DIRTY_PASSES)
            self._switch_writes(self.auto.after_pass(s))
            await self._pass(Pass.ALL)

    def _auto_sample(self, s: MigStats) -> None:
        """Auto mode, each sample: the switch policy.Auto decides, if any."""
        judging = self.phase in SYNCING and not self._paused and not self._cut_over
        self._switch_writes(self.auto.sample(s, time.monotonic(), judging=judging))

    def _switch_writes(self, switch: Switch | None) -> None:
        """Auto mode: switch the data plane's mode as decided, then tell the policy."""
        if switch is None:
            return
        a = self.auto
        self.target.set_mode(switch.mode)
        if switch.mode is native.MigMode.DBT:
            a.fell_back(time.monotonic())
            self.log.warning(
                "migration.fallback", device=self.device, to="dbt", fallbacks=a.fallbacks,
                mirror_wait_ms=round(a.mirror_wait_ms or 0, 3), threshold_ms=a.threshold_ms,
            )  # fmt: skip
        else:
            a.mirrored_again()
            self.log.info(
                "migration.mirror_again", device=self.device, why=switch.why,
                returns=a.mirror_returns, final=a.final, dirty=self.progress.last.dirty_chunks,
            )  # fmt: skip

    async def _converge_dbt(self) -> None:
        """Dirty passes until few chunks are dirty (or it stops shrinking, or the limit)."""

        async def dirty_pass() -> bool:
            await self._pass(Pass.DIRTY)
            return True

        await self._converge(
            "dirty", lambda s: s.dirty_chunks, self.policy.max_dirty_passes, Phase.DIRTY_PASSES,
            dirty_pass,
        )  # fmt: skip

    async def _converge_snapshot(self) -> None:
        """New deltas folded until the active one is small (or as for DBT)."""
        await self._converge(
            "delta", lambda s: s.delta_chunks, self.policy.max_generations, Phase.FOLDING,
            self._fold,
        )  # fmt: skip

    async def _converge(
        self,
        what: str,
        remaining: Callable[[MigStats], int],
        limit: int,
        phase: Phase,
        step: Callable[[], Awaitable[bool]],
    ) -> None:
        """Repeat ``step`` while ``remaining`` chunks are above the threshold, until it
        stops shrinking for ``stall_passes`` steps, ``limit`` steps, or ``step`` says no."""
        p = self.policy
        stall = Stall(p.stall_passes)
        for n in range(limit):
            left = remaining(self._checked_stats())
            if left <= p.dirty_threshold:
                return
            if stall.stalled(left):
                self.log.info("migration.not_converging", device=self.device, **{what: left})
                return
            if n == 0:
                self._set_phase(phase)
            if not await step():
                return
        self.log.info(
            "migration.pass_limit", device=self.device, passes=limit,
            **{what: remaining(self.progress.last)},
        )  # fmt: skip

    async def _hold_in_sync(self) -> None:
        """--no-cutover: stay in sync until `cutover` (or cancel, or a failure)."""
        p = self.policy
        self._set_phase(Phase.IN_SYNC)
        if self.opts.mode is Mode.DBT:
            interval = p.in_sync_dirty_interval
        elif self.opts.mode is Mode.SNAPSHOT:
            interval = p.in_sync_fold_interval
        else:
            interval = p.sample_interval  # mirror keeps mirroring: only watch for errors
        while True:
            with anyio.move_on_after(interval):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            self._check_cancel()
            s = self._checked_stats()
            if self._cutover_requested.is_set():
                self.log.info("migration.cutover_requested", device=self.device)
                return
            if self.opts.mode is Mode.DBT and s.dirty_chunks:
                await self._pass(Pass.DIRTY)
            elif self.opts.mode is Mode.SNAPSHOT and s.delta_chunks:
                await self._fold()

    async def _switch(self) -> None:
        """DBT's and snapshot's mirrored tail, then the cutover (--verify: paused, compared
        first)."""
        # The record is saved once around the switch, in the cutover's window
        # (_record_cutover, with the CUTOVER phase): a save takes tens of milliseconds (three
        # files, each synced), and where guest I/O is paused the guest waits for it.  The
        # phase change is not saved before it, and the switch's 'done' is saved after the
        # guest goes on: 'intent' names the destination as the disk already.
        if self.opts.mode in (Mode.DBT, Mode.SNAPSHOT):
            await self._mirror_tail()
        # every mode mirrors the guest's writes now
        if not self.opts.verify:
            self._set_phase(Phase.CUTOVER, save=False)
            await self._cutover()
            self._persist()
            return
        self._set_phase(Phase.VERIFYING)
        await self._pause()
        self._check_cancel()
        try:
            n = await anyio.to_thread.run_sync(self.target.verify)
        except native.NativeError as e:
            raise _Failed(f"cannot verify the destination: {e.detail}") from None
        self.verify_mismatches = n
        if n:
            raise _Failed(
                f"verification failed: {n} chunks of the destination differ from the disk"
            )
        self._check_cancel()
        self._set_phase(Phase.CUTOVER, save=False)
        await self._cutover()
        await self._resume()
        self._persist()

    async def _mirror_tail(self) -> None:
        """DBT and snapshot, once their passes or folds are done: mirror the guest's writes
        from here on (snapshot's go to the active delta and the destination) and copy the
        chunks still dirty (snapshot: those of the active delta), with the guest going on,
        instead of pausing it for a final pass.  A pass no longer races the guest: a write to
        a clean chunk reaches both images, one to a dirty chunk is copied after it (it holds
        the chunk), so one pass converges (mirror mode's rule), and the cutover is made the
        way mirror mode makes it, in a window that holds no guest request.

        Why not a final pass with the guest paused: it copies the whole hot set, and under
        random writes that is every chunk they touch: 0.4-0.6 s on a 128 MiB disk in the
        kernel VM, more on a bigger one.  Mirroring costs the guest a destination round trip
        per write instead, for the length of one pass, and never stops it.  (VMware's ESX 5
        replaced DBT by mirroring altogether, in part for this.)  A write routed before the
        switch, unmirrored, dirties its chunk when it is done, while it still holds the
        chunk: the pass's copy of that chunk waits for it, or a pass after it sees the bit."""
        self._set_phase(Phase.FINAL_PASS)
        self.target.set_mode(native.MigMode.MIRROR)
        await self._converge_mirror()

    def _record_cutover(self) -> None:
        """Target.cutover's record, made in its window (both images hold every write the guest
        was told is done, so a successor may serve either): from here on the destination is
        the disk, whether the switch happens or the daemon dies first.  Durable before the
        switch, or no switch."""
        self._cutting_over = "intent"
        self._persist(strict=True)

    def _unrecord_cutover(self) -> None:
        """Target.cutover's undoing (its record failed, or the destination did in the window):
        the record names the source again, durably, before the window closes.  If it cannot
        after a destination failure, the cutover is made anyway (the record may name the
        destination); after a failed record, the source stays the disk and later saves of
        the record say so."""
        self._cutting_over = None
        try:
            self._persist(strict=True)
        except OSError as e:
            self.log.error("migration.record_not_undone", device=self.device, error=str(e))
            raise

    async def _cutover(self) -> None:
        for attempt in range(self.policy.cutover_tries):
            self._check_cancel()
            t0 = time.monotonic()
            try:
                await anyio.to_thread.run_sync(
                    self.target.cutover, self._record_cutover, self._unrecord_cutover
                )
            except OSError as e:
                raise _Failed(
                    f"the cutover was not made: its record could not be saved ({e}); the source "
                    "stays the disk"
                ) from None
            except native.NativeError as e:
                if e.errno != errno.EAGAIN:
                    raise _Failed(f"the cutover failed: {e.detail}") from None
                self.log.info(
                    "migration.cutover_retry", device=self.device, attempt=attempt + 1,
                    why=e.detail,
                )  # fmt: skip
                await self._pass(Pass.FINAL if self._paused else Pass.ALL)
                continue
            self._cutting_over = "done"
            self.progress.cutover_after = time.monotonic() - self.progress.started
            s = self._stats()
            self.log.info(
                "migration.switched", device=self.device,
                cutover_pause_ms=ms(s.cutover_pause_ns),
                window_ms=round((time.monotonic() - t0) * 1e3, 3),
            )  # fmt: skip
            return
        raise _Failed(f"the cutover failed: not in sync after {self.policy.cutover_tries} tries")

    async def _sampler(self) -> None:
        while True:
            await anyio.sleep(self.policy.sample_interval)
            s = self._stats()
            if self.opts.mode is Mode.AUTO and self._live:
                self._auto_sample(s)
            if time.monotonic() - self.recorder.saved_at >= self.policy.persist_interval:
                self._persist()

    # --- endings ------------------------------------------------------------------------------
    async def _end(self, phase: Phase) -> None:
        """Cancelled or failed before the cutover: let go of the destination (shielded: this
        must happen even when the daemon's tasks are being cancelled)."""
        with anyio.CancelScope(shield=True):
            try:
                await self._finish()
            except native.NativeError as e:
                self.error = (
                    self.error + "; " if self.error else ""
                ) + f"finish failed: {e.detail}"
                phase = Phase.FAILED
        extra: dict[str, Any] = {}
        if phase is Phase.CANCELLED:
            extra["reason"] = self._cancel_reason
        self._set_phase(phase, source=self.source, **extra)

    async def _finish_completed(self) -> None:
        """After the cutover: measure the stall around it, then stop routing through the
        migration (the destination goes on serving)."""
        with anyio.CancelScope(shield=True):
            await self._resume()
            await anyio.sleep(self.policy.cutover_window)
            s = self._stats()
            self.cutover_stall_ns = s.cutover_latency_ns
            try:
                await self._finish()
            except native.NativeError as e:  # cut over already: the destination serves anyway
                self.log.error("migration.finish_failed", device=self.device, error=e.detail)
            self._set_phase(
                Phase.COMPLETED, dest=str(self.opts.dest),
                cutover_stall_ms=ms(self.cutover_stall_ns), final_pause_ms=ms(self.final_pause_ns),
                max_latency_ms=ms(s.max_latency_ns), bytes_skipped=s.bytes_skipped,
                elapsed=round(time.monotonic() - self.progress.started, 3),
            )  # fmt: skip
