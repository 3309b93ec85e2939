"""The machine's steps: the calls into the data plane's migration (a MigrationTarget) that the
machine takes at many points (a copy pass, pause, resume, a new delta, stats, speed, abort,
finish), made as they must be from the event loop: blocking ones in a worker thread, a pass
aborted when a cancel comes (_Cancelled), a failure as one line (_Failed: status's ``error``).
The calls that belong to one phase (mig_start, verify, cutover, reconnect) are in the machine
(machine.Migration), which is built on these.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio

from ublkmig import native
from ublkmig.log import get_logger
from ublkmig.migration.options import MigrationOptions
from ublkmig.migration.status import Progress
from ublkmig.native import MigStats, Pass


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
    def cutover(
        self,
        record: Callable[[], None] | None = None,
        unrecord: Callable[[], None] | None = None,
    ) -> None: ...
    def verify(self) -> int: ...
    def reconnect(self) -> None: ...
    def abort(self) -> None: ...
    def finish(self) -> None: ...
    def stats(self) -> MigStats: ...


def errno_text(err: int) -> str:
    """``-28`` -> ``No space left on device (ENOSPC)``."""
    code = abs(err)
    return f"{os.strerror(code)} ({errno.errorcode.get(code, str(code))})"


class _Cancelled(Exception):
    """cancel() came: the step that notices raises this, and the migration ends cancelled."""


class _Failed(Exception):
    """The migration failed; the message (one line) is status's ``error``."""


class Steps:
    """The data plane's migration of one device, and the state of its steps: the pass running
    (number, kind), guest I/O paused, the last stats read (``progress``).

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
        rate_window: float,
    ) -> None:
        self.target = target
        self.opts = opts
        self.device = device
        self.source = source
        self.log = get_logger()
        self._live = False  # the data plane's migration exists
        self.progress = Progress(size, opts.chunk_size, reach=opts.check_below,
                                 rate_window=rate_window)  # fmt: skip
        self._cancel = anyio.Event()
        self._pass_no = 0
        self._pass_kind: Pass | None = None
        self._passing = False
        self._paused = False
        self._pause_t0 = 0
        self._deltas_exhausted = False
        self.final_pause_ns: int | None = None

    def _stats(self) -> MigStats:
        if self._live:
            self.progress.read(self.target.stats(), time.monotonic())
        return self.progress.last

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

    async def _finish(self) -> None:
        self._stats()
        self._live = False  # from here on, nobody calls get_stats/abort/set_speed
        await anyio.to_thread.run_sync(self.target.finish)
        self._paused = False
