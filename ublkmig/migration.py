"""Live migration: the policy and its state machine, at chunk-pass granularity.

The data plane (native/migrate.c) routes every guest request and copies
chunks; this module decides which passes to run, when the copy is in sync,
when to pause guest I/O, when to cut over, and when to give up.  It runs as
one anyio task inside the ``serve`` daemon (and, in host tests, against the
simulator); every blocking data-plane call runs in a worker thread.

State machine (one ``migration.phase`` log event per change)::

    starting ─► copying ─┬─ mirror ──────────────────────────────┐
     (mig_start) (PASS_ALL)├─ dbt ──► dirty-passes (PASS_DIRTY)*──┤
                          └─ snapshot ► folding (new_delta+ALL)*─┤
                                                                 ▼
                          [--no-cutover: in-sync, until `cutover`]
                                                                 ▼
      final-pass (pause, PASS_FINAL; dbt, snapshot) ─► verifying (--verify, paused)
                                                                 ▼
                               cutover (resume; stall measured) ─► completed (finish)

    any phase before the cutover ── cancel ──► cancelling ─► cancelled (abort, finish)
    any phase before the cutover ── destination error / verify mismatch ─► failed (finish)

After ``completed`` the device serves from the destination; after
``cancelled`` or ``failed`` it serves from the source, which the migration
never wrote (in snapshot mode ``finish`` folds the deltas back into it).
"""

from __future__ import annotations

import enum
import errno
import itertools
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from ublkmig import native, snapshot
from ublkmig.errors import UserError
from ublkmig.log import get_logger
from ublkmig.native import MigStats, Pass
from ublkmig.units import format_size

DEFAULT_CHUNK_SIZE = 1 << 20
# chunks the copier reads from the source at a time while the guest has requests in
# flight (4 in flight otherwise)
DEFAULT_BUSY_DEPTH = 1


class Mode(enum.StrEnum):
    AUTO = "auto"  # mirror, falling back to dbt while the destination is too slow
    MIRROR = "mirror"
    DBT = "dbt"
    SNAPSHOT = "snapshot"

    @property
    def native(self) -> native.MigMode:
        """The data plane's mode to start in (auto starts mirroring)."""
        return native.MigMode.from_label("mirror" if self is Mode.AUTO else self.value)


class Phase(enum.StrEnum):
    STARTING = "starting"  # opening the destination, routing guest I/O through the migration
    COPYING = "copying"  # the first full pass (mirror: the only one)
    DIRTY_PASSES = "dirty-passes"  # dbt: passes over the dirty chunks
    FOLDING = "folding"  # snapshot: freeze the delta, fold it into the destination
    IN_SYNC = "in-sync"  # --no-cutover: kept in sync until `cutover`
    FINAL_PASS = "final-pass"  # dbt, snapshot: guest I/O paused, the last chunks copied
    VERIFYING = "verifying"  # --verify: guest I/O paused, destination compared
    RECONNECTING = "reconnecting"  # connections to the destination lost: dialling again
    CUTOVER = "cutover"  # switched to the destination (measuring the stall)
    COMPLETED = "completed"  # the device serves from the destination
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"  # the device serves from the source, untouched
    FAILED = "failed"  # the device serves from the source; see error


ENDED = frozenset({Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED})
SYNCING = frozenset({Phase.STARTING, Phase.COPYING, Phase.DIRTY_PASSES, Phase.FOLDING,
                     Phase.RECONNECTING})  # fmt: skip


class MigrationTarget(Protocol):
    """What the controller drives: native.Target of a device, or (host tests) a simulator
    adapter that runs the guest-thread-only calls on its guest thread.  copy_pass, abort,
    set_speed and stats may be called while a pass runs; the others never overlap."""

    def mig_start(self, config: native.MigrationConfig) -> None: ...
    def copy_pass(self, kind: Pass) -> int: ...
    def set_speed(self, bytes_per_second: int) -> None: ...
    def set_mode(self, mode: native.MigMode) -> None: ...
    def new_delta(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def cutover(self, record: Callable[[], None] | None = None) -> None: ...
    def verify(self) -> int: ...
    def reconnect(self) -> None: ...
    def abort(self) -> None: ...
    def finish(self) -> None: ...
    def stats(self) -> MigStats: ...


@dataclass(frozen=True)
class Policy:
    """The knobs of the state machine (tests shorten the timings)."""

    dirty_threshold: int = 16  # chunks: few enough to copy during the final pause
    max_dirty_passes: int = 10  # dbt: dirty passes before giving up on converging
    stall_passes: int = 2  # dbt: stop when the dirty count did not shrink this many passes
    max_generations: int = 6  # snapshot: deltas folded before the final pause
    in_sync_dirty_interval: float = 1.0  # dbt --no-cutover: a dirty pass this often
    in_sync_fold_interval: float = 3.0  # snapshot --no-cutover: a fold this often
    cutover_window: float = 1.1  # after the cutover, wait this long before reading its stall
    sample_interval: float = 0.5  # stats sampled this often (rate, error watch)
    persist_interval: float = 2.0  # the state for --resume is written this often (and at
    # every phase change)
    rate_window: float = 5.0  # the rate is measured over this many seconds
    cutover_tries: int = 5  # cutover refused (EAGAIN): copy what is missing and try again
    auto_sustain: int = 2  # auto: samples in a row over the wait threshold: fall back to dbt
    auto_probe: float = 2.0  # auto: after a fallback, mirror again this much later (doubling)
    auto_probe_max: float = 30.0
    auto_max_fallbacks: int = 6  # auto: after this many, mirror to converge whatever it costs
    reconnect_delay: float = 0.2  # first wait before dialling a lost destination again
    reconnect_max_delay: float = 5.0  # the wait doubles up to this
    reconnect_budget: float = 60.0  # give up (fail) when it is not back within this


DEFAULT_DEST_TIMEOUT = native.DEFAULT_NBD_TIMEOUT  # seconds
MIN_DEST_TIMEOUT, MAX_DEST_TIMEOUT = 0.1, 3600.0


def is_nbd_uri(text: str) -> bool:
    """Whether a destination names an NBD export (the data plane parses and checks it)."""
    return text.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


@dataclass(frozen=True)
class MigrationOptions:
    dest: Path | str  # a str: an NBD export's URI
    mode: Mode = Mode.AUTO
    chunk_size: int = DEFAULT_CHUNK_SIZE
    speed: int | None = None  # copier bytes/s; None: unlimited
    no_cutover: bool = False
    verify: bool = False
    dest_zeroed: bool = False  # a new sparse file: holes need no copy
    direct: bool = False
    copy_depth: int = 0
    # chunks the copier reads from the source at a time while the guest has requests in
    # flight, resting after each read as long as it took: it yields the source to the
    # guest (0: no yielding; writes to the destination stay pipelined either way)
    busy_depth: int = DEFAULT_BUSY_DEPTH
    delta_dir: Path | None = None
    # auto: fall back to dbt when mirrored writes wait this long on average for the
    # destination (after the source was done), sustained
    fallback_wait_ms: float = 20.0
    # resuming (--resume): chunks below this may hold an earlier copy on the destination:
    # compared before they are written
    resumed: bool = False
    check_below: int = 0
    # an NBD destination: the longest wait for the server (a reply, the dial, the handshake);
    # then the connection counts as lost (guest writes complete from the source, the chunks
    # go dirty, the migration reconnects)
    dest_timeout: float = DEFAULT_DEST_TIMEOUT
    dest_fd: int = 0  # > 0: a file destination's checked, locked descriptor (not saved)

    def native_config(self, source: str) -> native.MigrationConfig:
        return native.MigrationConfig(
            dest=self.dest,
            mode=self.mode.native,
            dest_zeroed=self.dest_zeroed,
            chunk_size=self.chunk_size,
            speed=self.speed or 0,
            direct=self.direct,
            copy_depth=self.copy_depth,
            busy_depth=self.busy_depth,
            delta_path=snapshot.delta_prefix(source, self.delta_dir),
            check_below=self.check_below,
            dest_timeout_ms=round(self.dest_timeout * 1000),
            dest_fd=self.dest_fd,
        )


def check_chunk_size(n: int) -> int:
    lo, hi = native.MIN_CHUNK_SIZE, native.MAX_CHUNK_SIZE
    if not lo <= n <= hi or n & (n - 1):
        raise UserError(
            f"chunk size must be a power of two from {format_size(lo)} to {format_size(hi)}, "
            f"not {n} bytes"
        )
    return n


MAX_SPEED = (1 << 63) - 1  # what the data plane's uint64 holds with room to spare


def check_speed(n: int | None) -> int | None:
    if n is not None and n <= 0:
        raise UserError("speed must be more than 0 bytes/s (leave it out for no limit)")
    if n is not None and n > MAX_SPEED:
        raise UserError(f"speed must be at most {MAX_SPEED} bytes/s, not {n}")
    return n


def check_dest_timeout(seconds: float) -> float:
    if not MIN_DEST_TIMEOUT <= seconds <= MAX_DEST_TIMEOUT:
        raise UserError(
            f"the destination timeout must be from {MIN_DEST_TIMEOUT} to {MAX_DEST_TIMEOUT} "
            f"seconds, not {seconds}"
        )
    return seconds


def check_fallback_wait(ms: float) -> float:
    if not ms > 0:
        raise UserError(f"the fallback wait must be a positive number of milliseconds, not {ms}")
    return ms


def check_mode(text: str) -> Mode:
    try:
        return Mode(text)
    except ValueError:
        known = ", ".join(m.value for m in Mode)
        raise UserError(f"unknown migration mode {text!r} (known: {known})") from None


def errno_text(err: int) -> str:
    """``-28`` -> ``No space left on device (ENOSPC)``."""
    code = abs(err)
    return f"{os.strerror(code)} ({errno.errorcode.get(code, str(code))})"


class _Cancelled(Exception):
    pass


class _Failed(Exception):
    pass


class Migration:
    """One migration of one device: ``await start()`` (mig_start; UserError if refused), then
    ``await run()`` until it ends.  cancel(), request_cutover(), set_speed() and status() are
    called from the same event loop at any time.

    Every get_stats/abort/set_speed call happens in the event loop's thread, and only while the
    data plane's migration exists (between mig_start and finish): the flag ``_live`` is
    cleared in this thread before finish starts in a worker.
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
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.target = target
        self.on_state = on_state  # persists resume_state() (the daemon: ublkmig.state)
        self.opts = opts
        self.device = device
        self.source = source
        self.size = size
        self.io_stats = io_stats
        self.policy = policy or Policy()
        self.log = get_logger()
        self.phase = Phase.STARTING
        self.error: str | None = None
        self.speed = opts.speed
        self._live = False  # the data plane's migration exists
        self._last = MigStats(size=size, chunk_size=opts.chunk_size)
        self._samples: deque[tuple[float, int]] = deque()
        self._pass_no = 0
        self._pass_kind: Pass | None = None
        self._passing = False
        self._paused = False
        self._pause_t0 = 0
        self._deltas_exhausted = False
        self._cut_over = False
        self._started = time.monotonic()
        self._ended: float | None = None
        self._cutover_after: float | None = None  # seconds from the start to the cutover
        self._created = time.time()
        self._cancel = anyio.Event()
        self._cancel_reason = ""
        self._cutover_requested = anyio.Event()
        self._done = anyio.Event()
        self._wakeup = anyio.Event()
        self.final_pause_ns: int | None = None
        self.cutover_stall_ns: int | None = None
        self.verify_mismatches: int | None = None
        self.reconnects = 0  # times the destination's lost connections were restored
        # auto mode: the data plane's current mode, switches, the recent mirror wait
        self.writes_mirrored = opts.mode is not Mode.DBT and opts.mode is not Mode.SNAPSHOT
        self.fallbacks = 0
        self.mirror_returns = 0
        self.mirror_wait_ms: float | None = None
        self._over = 0  # samples in a row over the threshold
        self._fell_back_at = 0.0
        self._wait_seen = (0, 0)  # (mirror_waits, mirror_wait_ns) at the last sample
        self._auto_done = False  # converged: mirror to the end
        self._auto_final = False  # no more fallbacks: mirror to the end, whatever it costs
        # chunks below this may hold copies on the destination (the copier's furthest
        # cursor; a resumed migration starts from its predecessor's)
        self._reach = opts.check_below
        self._cutting_over: str | None = None  # "intent" (in sync, switching), "done"
        self._persisted_at = 0.0

    # --- requests (event loop) ----------------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.phase in ENDED

    @property
    def in_sync(self) -> bool:
        return self.phase is Phase.IN_SYNC

    def cancel(self, reason: str = "request") -> None:
        """Stop before the cutover; the source stays authoritative.  UserError once cut over."""
        if self.ended:
            raise UserError(f"no migration is running on {self.device} ({self._outcome()})")
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
        if self.ended:
            raise UserError(f"no migration is running on {self.device} ({self._outcome()})")
        if self.phase in SYNCING:
            s = self._last
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
        if self.ended:
            raise UserError(f"no migration is running on {self.device} ({self._outcome()})")
        self.speed = bytes_per_second
        if not self._paused:  # the final pass runs unlimited
            self._apply_speed(bytes_per_second or 0)
        self.log.info("migration.speed", device=self.device, speed=bytes_per_second or "unlimited")

    def _outcome(self) -> str:
        said = {Phase.CANCELLED: "was cancelled"}.get(self.phase, str(self.phase))
        return f"the last one {said}"

    async def wait(self) -> Phase:
        await self._done.wait()
        return self.phase

    # --- status -------------------------------------------------------------------------------
    def _stats(self) -> MigStats:
        if self._live:
            self._last = self.target.stats()
            self._reach = max(self._reach, self._last.cursor)
            now = time.monotonic()
            self._samples.append((now, self._last.bytes_copied + self._last.bytes_skipped))
            while len(self._samples) > 2 and now - self._samples[1][0] > self.policy.rate_window:
                self._samples.popleft()
        return self._last

    def _rate(self) -> float:
        if len(self._samples) < 2 or self.ended:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def bytes_to_copy(self, s: MigStats) -> int:
        """Estimate: chunks not copied yet plus dirty ones (in snapshot mode every chunk the
        guest wrote since it was copied, active delta included), times the chunk size."""
        if self.phase is Phase.COMPLETED:
            return 0
        chunks = min(s.nr_chunks, max(0, s.nr_chunks - s.chunks_copied) + s.dirty_chunks)
        return min(chunks * s.chunk_size, max(s.size, self.size))

    def status(self) -> dict[str, Any]:
        s = self._stats()
        rate = self._rate()
        to_copy = self.bytes_to_copy(s)
        end = self._ended if self._ended is not None else time.monotonic()
        cursor = min(s.cursor * s.chunk_size, s.size) if s.chunk_size else 0
        eta: float | None = None
        if self.phase is Phase.IN_SYNC or self.ended:
            eta = 0.0
        elif rate > 0:
            eta = to_copy / rate

        def ms(ns: int | None) -> float | None:
            return None if ns is None else round(ns / 1e6, 3)

        return {
            "device": self.device,
            "source": self.source,
            "dest": str(self.opts.dest),
            "mode": str(self.opts.mode),
            "phase": str(self.phase),
            "pass": self._pass_no,
            "pass_kind": self._pass_kind.label if self._pass_kind is not None else None,
            "passing": self._passing,
            "cursor": cursor,
            "chunk_size": s.chunk_size or self.opts.chunk_size,
            "size": s.size or self.size,
            "chunks": s.nr_chunks,
            "chunks_copied": s.chunks_copied,
            "bytes_copied": s.bytes_copied,
            "bytes_skipped": s.bytes_skipped,
            "bytes_to_copy": to_copy,
            "dirty_chunks": s.dirty_chunks,
            "hot_chunks": s.hot_chunks,
            "generation": s.generation,
            "delta_chunks": s.delta_chunks,
            "mirrored_writes": s.mirrored_writes,
            "tracked_writes": s.tracked_writes,
            "parked": s.parked,
            "dest_errors": s.dest_errors,
            "dest_down": s.dest_down,
            "reconnects": self.reconnects,
            "writes": "mirrored" if self.writes_mirrored else "tracked",
            "fallbacks": self.fallbacks,
            "mirror_returns": self.mirror_returns,
            "mirror_wait_ms": (
                None if self.mirror_wait_ms is None else round(self.mirror_wait_ms, 4)
            ),
            "bytes_matched": s.bytes_matched,
            "busy_depth": self.opts.busy_depth,
            "yielded_seconds": round(s.yield_ns / 1e9, 3),
            "resumed": self.opts.resumed,
            "paused": self._paused,
            "rate": round(rate),
            "eta_seconds": None if eta is None else round(eta, 1),
            "elapsed": round(end - self._started, 3),
            # the migration's own time: start to cutover (elapsed also counts the stall
            # measurement after it)
            "cutover_after": None if self._cutover_after is None else round(self._cutover_after, 3),
            "started_at": self._created,
            "speed": self.speed,
            "no_cutover": self.opts.no_cutover,
            "verify": self.opts.verify,
            "verify_mismatches": self.verify_mismatches,
            "max_latency_ms": ms(s.max_latency_ns),
            # the cutover's hold of guest I/O (in DBT and snapshot mode inside the final
            # pause), and the slowest guest request within a second of the switch
            "cutover_pause_ms": ms(s.cutover_pause_ns) if self._cut_over else None,
            "cutover_stall_ms": ms(self.cutover_stall_ns),
            "final_pause_ms": ms(self.final_pause_ns),
            "error": self.error,
            "io": self._io(),
        }

    def _io(self) -> dict[str, int]:
        """The device's guest I/O counters ({} if it is gone)."""
        if self.io_stats is None:
            return {}
        try:
            return self.io_stats()
        except native.NativeError:
            return {}

    def _set_phase(self, phase: Phase, **extra: Any) -> None:
        if self.phase is Phase.CANCELLING and phase not in ENDED:
            return  # the step that was starting will notice the cancel
        self.phase = phase
        s = self._stats()
        if phase in ENDED:
            self._ended = time.monotonic()
        fields: dict[str, Any] = {
            "device": self.device,
            "mode": str(self.opts.mode),
            "phase": str(phase),
            "pass": self._pass_no,
            "cursor": min(s.cursor * s.chunk_size, s.size),
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
        if phase not in ENDED:
            self._persist()

    def resume_state(self) -> dict[str, Any]:
        """What ``--resume`` needs to go on after the daemon died (ublkmig.state)."""
        o = self.opts
        return {
            "device": self.device, "source": self.source, "dest": str(o.dest),
            "mode": str(o.mode), "chunk_size": o.chunk_size, "speed": self.speed,
            "no_cutover": o.no_cutover, "verify": o.verify, "direct": o.direct,
            "fallback_wait_ms": o.fallback_wait_ms, "yield": o.busy_depth > 0,
            "dest_timeout": o.dest_timeout,
            "phase": str(self.phase),
            "reach": self._reach, "chunks": self._last.nr_chunks,
            "cut_over": self._cutting_over, "updated": time.time(),
            # snapshot: where the deltas and their layer map are (a takeover folds them back)
            "deltas": (str(snapshot.delta_prefix(self.source, o.delta_dir))
                       if o.mode is Mode.SNAPSHOT else None),
        }  # fmt: skip

    def _persist(self, strict: bool = False) -> None:
        """Save resume_state(); a failure is only logged unless ``strict`` (the cutover record:
        the switch waits for it and does not happen without it)."""
        if self.on_state is None:
            return
        self._persisted_at = time.monotonic()
        try:
            self.on_state(self.resume_state())
        except OSError as e:
            if strict:
                raise
            # the migration goes on: the source stays the disk, only --resume would miss it
            self.log.warning("migration.state_not_saved", device=self.device, error=str(e))

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
        self._started = time.monotonic()
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
        self._apply_speed(self.speed or 0)  # (a final pass runs unlimited)
        if self.opts.mode is Mode.AUTO and self.writes_mirrored and not self._auto_final:
            self._fall_back()  # track the guest's writes on the source while it is away
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
            s = self._checked_stats()
            if s.dirty_chunks == 0 and s.chunks_copied >= s.nr_chunks:
                return
            await self._pass(Pass.ALL)
        s = self._checked_stats()
        raise _Failed(f"the mirror did not converge: {s.dirty_chunks} chunks still dirty")

    async def _converge_auto(self) -> None:
        """Passes until the writes are mirrored again and nothing is dirty: then the
        cutover needs no pause.  (The sampler switches modes meanwhile; past the fallback
        limit it mirrors for good, so this ends.)"""
        best: int | None = None  # fewest dirty chunks after a pass while tracked
        flat = 0
        while True:
            s = self._checked_stats()
            if self.writes_mirrored and s.dirty_chunks == 0 and s.chunks_copied >= s.nr_chunks:
                self._auto_done = True
                return
            if self.writes_mirrored:
                best, flat = None, 0
            else:
                if self.phase is not Phase.DIRTY_PASSES:
                    self._set_phase(Phase.DIRTY_PASSES)
                if s.dirty_chunks <= self.policy.dirty_threshold:
                    self._mirror_again("few dirty chunks left")
                elif s.chunks_copied >= s.nr_chunks:  # copied once: these were dirty passes
                    if best is None or s.dirty_chunks < best:
                        best, flat = s.dirty_chunks, 0
                    else:
                        flat += 1
                    if flat >= self.policy.stall_passes:
                        # The guest dirties chunks as fast as the copier cleans them: only
                        # mirroring (the guest waiting on the destination) gets there.
                        self._auto_final = True
                        self._mirror_again("dirty tracking is not converging")
            await self._pass(Pass.ALL)

    def _auto_sample(self, s: MigStats) -> None:
        """Auto mode, each sample: fall back to dbt while mirrored writes wait too long for
        the destination; mirror again after a while (the wait doubles each fallback)."""
        p = self.policy
        n0, ns0 = self._wait_seen
        self._wait_seen = (s.mirror_waits, s.mirror_wait_ns)
        if self.phase not in SYNCING or self._paused or self._cut_over or self._auto_done:
            return
        if self.writes_mirrored:
            if s.mirror_waits <= n0:
                # none completed: the writes waiting for the destination right now are
                # judged by their wait so far (one that stopped answering shows before any
                # of them completes)
                if not s.dest_waiting:
                    return  # no mirrored writes this sample: nothing to judge
                self.mirror_wait_ms = s.dest_waiting_ns / 1e6
            else:
                self.mirror_wait_ms = (s.mirror_wait_ns - ns0) / (s.mirror_waits - n0) / 1e6
            over = self.mirror_wait_ms > self.opts.fallback_wait_ms
            self._over = self._over + 1 if over else 0
            if self._over >= p.auto_sustain and not self._auto_final:
                self._fall_back()
            return
        probe = min(p.auto_probe * 2 ** (self.fallbacks - 1), p.auto_probe_max)
        if time.monotonic() - self._fell_back_at >= probe:
            self._mirror_again(f"{probe:g} s after the fallback")

    def _fall_back(self) -> None:
        self.target.set_mode(native.MigMode.DBT)
        self.writes_mirrored = False
        self.fallbacks += 1
        self._over = 0
        self._fell_back_at = time.monotonic()
        self.log.warning(
            "migration.fallback", device=self.device, to="dbt", fallbacks=self.fallbacks,
            mirror_wait_ms=round(self.mirror_wait_ms or 0, 3),
            threshold_ms=self.opts.fallback_wait_ms,
        )  # fmt: skip

    def _mirror_again(self, why: str) -> None:
        if self.writes_mirrored:
            return
        self.target.set_mode(native.MigMode.MIRROR)
        self.writes_mirrored = True
        self.mirror_returns += 1
        self._over = 0
        if self.fallbacks >= self.policy.auto_max_fallbacks:
            self._auto_final = True
        self.log.info(
            "migration.mirror_again", device=self.device, why=why, returns=self.mirror_returns,
            final=self._auto_final, dirty=self._last.dirty_chunks,
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
        remaining: Callable[[native.MigStats], int],
        limit: int,
        phase: Phase,
        step: Callable[[], Awaitable[bool]],
    ) -> None:
        """Repeat ``step`` while ``remaining`` chunks are above the threshold, until it
        stops shrinking for ``stall_passes`` steps, ``limit`` steps, or ``step`` says no."""
        p = self.policy
        best: int | None = None
        flat = 0
        for n in range(limit):
            left = remaining(self._checked_stats())
            if left <= p.dirty_threshold:
                return
            if best is None or left < best:
                best, flat = left, 0
            else:
                flat += 1
                if flat >= p.stall_passes:
                    self.log.info("migration.not_converging", device=self.device, **{what: left})
                    return
            if n == 0:
                self._set_phase(phase)
            if not await step():
                return
        self.log.info(
            "migration.pass_limit", device=self.device, passes=limit,
            **{what: remaining(self._last)},
        )  # fmt: skip

    async def _fold(self) -> bool:
        """Freeze the active delta and fold it into the destination; False when the data
        plane can open no more deltas (the final pass takes the active one then)."""
        self._check_cancel()
        if self._deltas_exhausted:
            return False
        try:
            await anyio.to_thread.run_sync(self.target.new_delta)
        except native.NativeError as e:
            if e.errno == errno.ENOSPC:
                self._deltas_exhausted = True
                self.log.info("migration.no_more_deltas", device=self.device, why=e.detail)
                return False
            raise _Failed(f"cannot start a new delta: {e.detail}") from None
        await self._pass(Pass.ALL)
        return True

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
        """Final pass (paused), verify, cut over, resume."""
        mirror = self.opts.mode in (Mode.MIRROR, Mode.AUTO)  # (auto ends mirroring)
        if mirror and not self.opts.verify:
            self._set_phase(Phase.CUTOVER)
            await self._cutover()
            return
        self._set_phase(Phase.VERIFYING if mirror else Phase.FINAL_PASS)
        await self._pause()
        if not mirror:
            # the guest waits for this pass: no speed limit
            self._apply_speed(0)
            await self._pass(Pass.FINAL)
            self._apply_speed(self.speed or 0)
        if self.opts.verify:
            if not mirror:
                self._set_phase(Phase.VERIFYING)
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
        self._set_phase(Phase.CUTOVER)
        await self._cutover()
        await self._resume()

    def _record_cutover(self) -> None:
        """Target.cutover's record, with guest I/O held and both sides equal: from here on the
        destination is the disk, whether the switch happens or the daemon dies first (its
        successor must serve the destination).  Durable before the switch, or no switch."""
        self._cutting_over = "intent"
        try:
            self._persist(strict=True)
        except OSError:
            self._cutting_over = None
            raise

    async def _cutover(self) -> None:
        for attempt in range(self.policy.cutover_tries):
            self._check_cancel()
            try:
                await anyio.to_thread.run_sync(self.target.cutover, self._record_cutover)
            except OSError as e:
                self._persist()  # (the old record stands, or this one says the source)
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
            self._cut_over = True
            self._cutover_after = time.monotonic() - self._started
            self._cutting_over = "done"
            s = self._stats()
            self.log.info(
                "migration.switched", device=self.device,
                cutover_pause_ms=round(s.cutover_pause_ns / 1e6, 3),
            )  # fmt: skip
            self._persist()
            return
        raise _Failed(f"the cutover failed: not in sync after {self.policy.cutover_tries} tries")

    async def _pause(self) -> None:
        self._check_cancel()
        self._pause_t0 = time.monotonic_ns()
        await anyio.to_thread.run_sync(self.target.pause)
        self._paused = True

    async def _resume(self) -> None:
        if not self._paused:
            return
        await anyio.to_thread.run_sync(self.target.resume)
        own = time.monotonic_ns() - self._pause_t0
        self._paused = False
        s = self._stats()
        self.final_pause_ns = s.last_pause_ns or own

    async def _pass(self, kind: Pass) -> int:
        """One copy pass in a worker thread, aborted if cancel() comes meanwhile."""
        self._check_cancel()
        self._pass_no += 1
        self._pass_kind = kind
        self._passing = True
        result: int | None = None
        failure: native.NativeError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._abort_on_cancel)
            try:
                result = await anyio.to_thread.run_sync(self.target.copy_pass, kind)
            except native.NativeError as e:
                failure = e
            finally:
                self._passing = False
                tg.cancel_scope.cancel()
        self._check_cancel()
        if failure is not None:
            if failure.errno == errno.ECANCELED:
                raise _Cancelled
            raise _Failed(self._failure_text(failure))
        s = self._checked_stats()
        self.log.debug(
            "migration.pass", device=self.device, **{"pass": self._pass_no}, kind=kind.label,
            chunks=result, dirty=s.dirty_chunks, hot=s.hot_chunks, copied=s.chunks_copied,
            delta_chunks=s.delta_chunks,
        )  # fmt: skip
        return result or 0

    async def _abort_on_cancel(self) -> None:
        await self._cancel.wait()
        # a pass clears the abort flag as it starts: repeat until it has returned
        while self._passing:
            self._abort()
            await anyio.sleep(0.05)

    def _apply_speed(self, bytes_per_second: int) -> None:
        if self._live:
            self.target.set_speed(bytes_per_second)

    def _abort(self) -> None:
        if self._live and self._passing:
            try:
                self.target.abort()
            except native.NativeError as e:  # the pass just ended: harmless
                self.log.debug("migration.abort_refused", device=self.device, why=str(e))

    def _failure_text(self, e: native.NativeError) -> str:
        s = self._stats()
        if s.error:
            return self._error_text(s)
        return f"the copy failed: {e.detail}"

    def _error_text(self, s: MigStats) -> str:
        if s.delta_failed:
            # guest writes wait (parked) for finish to fold the deltas back into the source
            where = self.opts.delta_dir or Path(self.source).parent
            return (f"a snapshot delta in {where} failed: {errno_text(s.error)}; the guest's "
                    "writes since the start go back into the source")
        return f"the destination failed: {errno_text(s.error)}"

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _checked_stats(self) -> MigStats:
        s = self._stats()
        if s.error:
            raise _Failed(self._error_text(s))
        return s

    async def _sampler(self) -> None:
        while True:
            await anyio.sleep(self.policy.sample_interval)
            s = self._stats()
            if self.opts.mode is Mode.AUTO and self._live:
                self._auto_sample(s)
            if time.monotonic() - self._persisted_at >= self.policy.persist_interval:
                self._persist()

    # --- endings ------------------------------------------------------------------------------
    async def _finish(self) -> None:
        self._stats()
        self._live = False  # from here on, nobody calls get_stats/abort/set_speed
        await anyio.to_thread.run_sync(self.target.finish)
        self._paused = False

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
                cutover_stall_ms=round(self.cutover_stall_ns / 1e6, 3),
                final_pause_ms=(
                    round(self.final_pause_ns / 1e6, 3) if self.final_pause_ns is not None
                    else None
                ),
                max_latency_ms=round(s.max_latency_ns / 1e6, 3),
                bytes_skipped=s.bytes_skipped, elapsed=round(time.monotonic() - self._started, 3),
            )  # fmt: skip


# --- the destination ----------------------------------------------------------------------------


@dataclass
class Destination:
    """DEST, opened read-write with an exclusive flock held for the migration's life (an NBD
    export: its URI, fd -1; the data plane opens it)."""

    path: Path | str
    fd: int
    size: int
    created: bool  # a new sparse file made here (reads as zeroes)

    def close(self, remove_created: bool = False) -> None:
        if self.fd >= 0:
            if remove_created and self.created:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = -1


def _same_storage(a: os.stat_result, b: os.stat_result) -> bool:
    import stat

    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _sysfs_block(st: os.stat_result, sysfs: Path) -> Path | None:
    import stat

    if not stat.S_ISBLK(st.st_mode):
        return None
    return sysfs / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _loop_backing(st: os.stat_result, sysfs: Path) -> os.stat_result | None:
    """A loop device's backing file, as it is now (None: not a loop device, or detached); for a
    partition of one, its disk's."""
    node = _sysfs_block(st, sysfs)
    if node is not None and (node / "partition").exists():
        node = node.resolve().parent
    backing = _read(node / "loop" / "backing_file") if node is not None else None
    if not backing:
        return None
    try:
        return os.stat(backing.removesuffix(" (deleted)"))
    except OSError:
        return None


def _extent(st: os.stat_result, sysfs: Path) -> tuple[str, int, int] | None:
    """A block device as (its whole disk's MAJ:MIN, first sector, sectors)."""
    node = _sysfs_block(st, sysfs)
    if node is None:
        return None
    size = _read(node / "size")
    if size is None:
        return None
    if (node / "partition").exists():
        whole = _read(node.resolve().parent / "dev")
        start = _read(node / "start")
        if whole is None or start is None:
            return None
        return whole, int(start), int(size)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", 0, int(size)


def storage_overlap(a: os.stat_result, b: os.stat_result, sysfs: Path = Path("/sys")) -> bool:
    """Whether writing one would change the other: the same file or device, a loop device over
    the other (either way round), or block devices sharing sectors of one disk (a partition
    and its whole disk, overlapping partitions)."""
    if _same_storage(a, b):
        return True
    ea, eb = _extent(a, sysfs), _extent(b, sysfs)
    if ea is not None and eb is not None and ea[0] == eb[0]:  # one disk: by its sectors
        return ea[1] < eb[1] + eb[2] and eb[1] < ea[1] + ea[2]
    for x, y in ((a, b), (b, a)):
        backing = _loop_backing(x, sysfs)
        if backing is not None and storage_overlap(backing, y, sysfs):
            return True
    return False


def open_destination(
    dest: Path,
    *,
    source: Path,
    size: int,
    device_node: str | None = None,
    who_holds: Callable[[Path], str | None] | None = None,
) -> Destination:
    """Check DEST for a migration of ``source`` (``size`` bytes) and lock it; create it (sparse,
    at the source's size) if missing.  UserError, one line, for anything wrong.

    ``who_holds(path)`` names what holds a DEST that is locked (a daemon serving it, or
    another migration); it may block (it asks the other daemons).
    """
    import fcntl
    import stat

    if not dest.is_absolute():
        raise UserError(f"the destination must be an absolute path, not {dest}")
    parent = dest.parent
    if not parent.is_dir():
        raise UserError(f"the destination's directory does not exist: {parent}")
    src_st = os.stat(source)
    created = False
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"cannot access the destination {dest}: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"the destination is a directory: {dest}")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UserError(f"the destination is not a regular file or a block device: {dest}")
        if _same_storage(st, src_st):
            raise UserError(f"the destination is the source: {dest}")
        if storage_overlap(st, src_st):
            raise UserError(
                f"the destination {dest} shares storage with the source {source} (a loop device "
                "over it, or overlapping partitions of one disk): writing one would change "
                "the other"
            )
        if device_node is not None:
            try:
                if _same_storage(st, os.stat(device_node)):
                    raise UserError(f"the destination is the device being migrated: {dest}")
            except FileNotFoundError:
                pass
    try:
        if st is None:
            mode = stat.S_IMODE(src_st.st_mode) if stat.S_ISREG(src_st.st_mode) else 0o600
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            created = True
        elif stat.S_ISBLK(st.st_mode):
            # O_EXCL on a block device: refused while it is mounted or claimed elsewhere
            fd = os.open(dest, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        else:
            fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY and st is not None:
            raise UserError(
                f"the destination {dest} is in use (mounted, or held by another program)"
            ) from None
        what = "create" if st is None else "open"
        raise UserError(f"cannot {what} the destination {dest}: {e.strerror}") from None
    d = Destination(dest, fd, 0, created)
    try:
        if st is not None and not _same_storage(os.fstat(fd), st):
            # (the data plane uses this descriptor, not the path, so what was checked is used)
            raise UserError(f"the destination {dest} changed while it was being checked")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = who_holds(dest) if who_holds is not None else None
            raise UserError(
                f"the destination {dest} is in use by "
                + (holder or "another migration or process (it is locked)")
            ) from None
        if created:
            os.ftruncate(fd, size)
        d.size = os.lseek(fd, 0, os.SEEK_END)
        if d.size < size:
            raise UserError(
                f"the destination {dest} ({d.size} bytes, {format_size(d.size)}) is smaller "
                f"than the source ({size} bytes, {format_size(size)})"
            )
    except UserError:
        d.close(remove_created=True)
        raise
    except OSError as e:
        d.close(remove_created=True)
        raise UserError(f"cannot prepare the destination {dest}: {e.strerror}") from None
    return d


def describe_holder(infos: list[dict[str, Any]], dest: Path) -> str | None:
    """Which daemon (of these ``info`` answers) holds ``dest``: as its image, or as the
    destination of its migration."""
    for info in infos:
        for key, what in (("image", "serving it"), ("migration_dest", "migrating to it")):
            other = info.get(key)
            if not isinstance(other, str):
                continue
            try:
                if os.path.samefile(other, dest):
                    return f"{info.get('path')} (pid {info.get('pid')}), {what}"
            except OSError:
                continue
    return None
