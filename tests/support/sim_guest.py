"""A guest on the simulator for migration tests, and the migration target adapter over it.

A Sim has no thread of its own: the thread that submits and waits for its guest I/O must also
be the one that calls mig_start/pause/resume/cutover/finish/new_delta/verify on it (they drive
its ring while they wait for guest requests to drain).  :class:`SimGuest` is that thread: it
submits random requests against a model of the disk (a bytearray), checks every read against
it, and between requests runs the control calls other threads queue with :meth:`SimGuest.call`.
:class:`SimTarget` is the ``MigrationTarget`` the controller drives: its guest-thread calls go
through the queue, the others (copy_pass, abort, set_speed, stats) run where they are called.

(Used by the tests and by fake_serve.py.)
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ublkmig import native
from ublkmig.native import F_FUA, MigStats, Op, Pass, Sim

BLOCK = 4096


@dataclass
class Inflight:
    op: Op
    offset: int
    length: int
    expected: bytes | None = None  # a READ: what the model held when it was submitted


@dataclass
class GuestCounters:
    submitted: int = 0
    completed: int = 0
    submitted_paused: int = 0  # requests submitted while guest I/O was paused (they park)
    by_op: dict[str, int] = field(default_factory=dict)


class SimGuest:
    """The Sim's only thread: random guest I/O (if ``io``) and the queued control calls."""

    def __init__(
        self,
        sim: Sim,
        model: bytearray,
        *,
        seed: int = 1,
        depth: int = 8,
        io: bool = True,
        max_blocks: int = 64,
        region: tuple[int, int] | None = None,
    ) -> None:
        self.sim = sim
        self.model = model
        self.rng = random.Random(seed)
        self.depth = depth
        self.io = io
        self.max_blocks = max_blocks
        self.region = region or (0, len(model))  # where the guest writes and reads
        self.paused = False
        self.errors: list[str] = []
        self.counters = GuestCounters()
        self._inflight: dict[int, Inflight] = {}
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._io_on = threading.Event()
        if io:
            self._io_on.set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sim-guest", daemon=True)
        self._failure: BaseException | None = None

    # --- other threads ------------------------------------------------------------------------
    def start(self) -> SimGuest:
        self._thread.start()
        return self

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the guest thread; its result or exception comes back here."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        fut: Future[Any] = Future()
        self._calls.put((lambda: fn(*args), fut))
        return fut.result(timeout=120)

    def set_io(self, on: bool) -> None:
        """Start or stop submitting new requests (those in flight complete)."""
        if on:
            self._io_on.set()
        else:
            self._io_on.clear()

    def stop(self) -> None:
        """Stop submitting, complete what is in flight, end the thread; raise what it raised."""
        self._stopping.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the guest thread did not stop"
        if self._failure is not None:
            raise self._failure

    # --- the guest thread ---------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while True:
                ran = self._run_calls()
                stopping = self._stopping.is_set()
                if stopping and not self._inflight:
                    return
                if self.paused:
                    # never block while paused: resume comes through this thread
                    if not stopping and self._io_on.is_set() and len(self._inflight) < 2:
                        if self._submit_random():
                            self.counters.submitted_paused += 1
                    self.sim.poll()
                    time.sleep(0.0002)
                    continue
                want_io = self._io_on.is_set() and not stopping
                if want_io and len(self._inflight) < self.depth and self.rng.random() < 0.7:
                    self._submit_random()
                elif self._inflight:
                    self._complete_one()
                elif not ran:
                    self._wait_for_call(0.001 if want_io else 0.02)
        except BaseException as e:  # reported by stop(); calls still queued get it too
            self._failure = e
            while True:
                try:
                    _, fut = self._calls.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(e)

    def _run_calls(self) -> bool:
        ran = False
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def _wait_for_call(self, timeout: float) -> None:
        try:
            fn, fut = self._calls.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)

    def _overlaps(self, offset: int, length: int) -> bool:
        # the block layer never has overlapping requests in flight together
        return any(
            offset < r.offset + r.length and r.offset < offset + length
            for r in self._inflight.values()
        )

    def _submit_random(self) -> bool:
        rng = self.rng
        lo, hi = self.region
        op = rng.choices(
            [Op.READ, Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES, Op.FLUSH], [25, 50, 8, 8, 9]
        )[0]
        offset = lo + rng.randrange((hi - lo) // BLOCK) * BLOCK
        length = min(rng.randint(1, self.max_blocks) * BLOCK, hi - offset)
        if op == Op.FLUSH:
            offset = length = 0
        elif self._overlaps(offset, length):
            return False
        flags = F_FUA if op == Op.WRITE and rng.random() < 0.1 else 0
        entry = Inflight(op, offset, length)
        if op == Op.WRITE:
            data = rng.randbytes(length)
            ticket = self.sim.submit(op, offset, data=data, flags=flags)
            self.model[offset : offset + length] = data
        elif op == Op.READ:
            ticket = self.sim.submit(op, offset, length)
            entry.expected = bytes(self.model[offset : offset + length])
        else:
            ticket = self.sim.submit(op, offset, length)
            if op != Op.FLUSH:
                self.model[offset : offset + length] = bytes(length)
        self._inflight[ticket] = entry
        self.counters.submitted += 1
        self.counters.by_op[op.name] = self.counters.by_op.get(op.name, 0) + 1
        return True

    def _complete_one(self) -> None:
        c = self.sim.wait()
        if c is None:
            return
        entry = self._inflight.pop(c.ticket)
        self.counters.completed += 1
        if c.result < 0:
            self.errors.append(f"{entry.op.name} at {entry.offset} +{entry.length}: {c.result}")
        elif c.result != entry.length:
            self.errors.append(f"{entry.op.name} at {entry.offset}: short ({c.result})")
        elif entry.op == Op.READ and c.data != entry.expected:
            self.errors.append(f"READ at {entry.offset} +{entry.length}: not the model's data")


class SimTarget:
    """ublkmig.migration.MigrationTarget over a SimGuest's simulator."""

    def __init__(self, guest: SimGuest) -> None:
        self.guest = guest
        self.t = guest.sim.target()
        self.calls: list[str] = []  # the guest-thread calls made, in order (for tests)
        self.fail_next: dict[str, BaseException] = {}  # name -> exception to raise once

    def _on_guest(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(name)
        if name in self.fail_next:
            raise self.fail_next.pop(name)
        return self.guest.call(fn, *args)

    def mig_start(self, config: native.MigrationConfig) -> None:
        self._on_guest("mig_start", self.t.mig_start, config)

    def copy_pass(self, kind: Pass) -> int:
        if "copy_pass" in self.fail_next:
            raise self.fail_next.pop("copy_pass")
        return self.t.copy_pass(kind)

    def set_mode(self, mode: native.MigMode) -> None:  # an atomic store: any thread
        self.calls.append(f"set_mode {mode.name.lower()}")
        self.t.set_mode(mode)

    def set_speed(self, bytes_per_second: int) -> None:
        self.t.set_speed(bytes_per_second)

    def abort(self) -> None:
        self.t.abort()

    def reconnect(self) -> None:  # dials only: any thread
        self.calls.append("reconnect")
        self.t.reconnect()

    def stats(self) -> MigStats:
        return self.t.stats()

    def new_delta(self) -> None:
        self._on_guest("new_delta", self.t.new_delta)

    def pause(self) -> None:
        def pause() -> None:
            self.t.pause()
            self.guest.paused = True

        self._on_guest("pause", pause)

    def resume(self) -> None:
        def resume() -> None:
            self.t.resume()
            self.guest.paused = False

        self._on_guest("resume", resume)

    def cutover(
        self,
        record: Callable[[], None] | None = None,
        unrecord: Callable[[], None] | None = None,
    ) -> None:
        self._on_guest("cutover", self.t.cutover, record, unrecord)

    def verify(self) -> int:
        return int(self._on_guest("verify", self.t.verify))

    def finish(self) -> None:
        def finish() -> None:
            try:
                self.t.finish()
            finally:
                self.guest.paused = False

        self._on_guest("finish", finish)
