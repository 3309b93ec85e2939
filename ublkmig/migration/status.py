"""What ``status`` answers of a migration: how far it is (the data plane's counters as the
machine last read them, the copier's reach, the copy rate, what is left to copy, the time to
go), how long it took, and the rest of its state as the machine hands it over."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ublkmig.migration.options import MigrationOptions
from ublkmig.migration.phase import ENDED, Phase
from ublkmig.migration.policy import Auto
from ublkmig.native import MigStats, Pass


class Progress:
    """The last stats read (``read``, each time the machine asks the data plane), the samples
    of the rate over the last ``rate_window`` seconds, and the migration's clock."""

    def __init__(self, size: int, chunk_size: int, *, reach: int, rate_window: float) -> None:
        self.size = size
        self.last = MigStats(size=size, chunk_size=chunk_size)
        # chunks below this may hold copies on the destination (the copier's furthest
        # cursor; a resumed migration starts from its predecessor's)
        self.reach = reach
        self.rate_window = rate_window
        self._samples: deque[tuple[float, int]] = deque()
        self.started = time.monotonic()  # (again when the data plane's migration started)
        self.ended_at: float | None = None
        self.cutover_after: float | None = None  # seconds from the start to the cutover
        self.created = time.time()

    def read(self, s: MigStats, now: float) -> None:
        self.last = s
        self.reach = max(self.reach, s.cursor)
        self._samples.append((now, s.bytes_copied + s.bytes_skipped))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.rate_window:
            self._samples.popleft()

    def rate(self) -> float:
        """Bytes per second copied (or skipped) over the samples kept."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def bytes_to_copy(self) -> int:
        """Estimate: chunks not copied yet plus dirty ones (in snapshot mode every chunk the
        guest wrote since it was copied, active delta included), times the chunk size."""
        s = self.last
        chunks = min(s.nr_chunks, max(0, s.nr_chunks - s.chunks_copied) + s.dirty_chunks)
        return min(chunks * s.chunk_size, max(s.size, self.size))

    def cursor(self) -> int:
        """The copier's cursor in bytes."""
        s = self.last
        return min(s.cursor * s.chunk_size, s.size) if s.chunk_size else 0


def eta(phase: Phase, to_copy: int, rate: float) -> float | None:
    """Seconds to go: 0 in sync (until `cutover`) and once ended; None without a rate yet."""
    if phase is Phase.IN_SYNC or phase in ENDED:
        return 0.0
    return to_copy / rate if rate > 0 else None


def ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def report(
    progress: Progress,
    o: MigrationOptions,
    auto: Auto,
    *,
    device: str,
    source: str,
    phase: Phase,
    pass_no: int,
    pass_kind: Pass | None,
    passing: bool,
    paused: bool,
    cut_over: bool,
    speed: int | None,
    reconnects: int,
    verify_mismatches: int | None,
    cutover_stall_ns: int | None,
    final_pause_ns: int | None,
    error: str | None,
    io: dict[str, int],
) -> dict[str, Any]:
    """The ``status`` answer (``migration`` in a device's status)."""
    s = progress.last
    rate = 0.0 if phase in ENDED else progress.rate()
    to_copy = 0 if phase is Phase.COMPLETED else progress.bytes_to_copy()
    end = progress.ended_at if progress.ended_at is not None else time.monotonic()
    to_go = eta(phase, to_copy, rate)
    return {
        "device": device,
        "source": source,
        "dest": str(o.dest),
        "mode": str(o.mode),
        "phase": str(phase),
        "pass": pass_no,
        "pass_kind": pass_kind.label if pass_kind is not None else None,
        "passing": passing,
        "cursor": progress.cursor(),
        "chunk_size": s.chunk_size or o.chunk_size,
        "size": s.size or progress.size,
        "chunks": s.nr_chunks,
        "chunks_copied": s.chunks_copied,
        "bytes_copied": s.bytes_copied,
        "bytes_skipped": s.bytes_skipped,
        "bytes_to_copy": to_copy,
        "dirty_chunks": s.dirty_chunks,
        "hot_chunks": s.hot_chunks,
        "generation": s.generation,
        "delta_chunks": s.delta_chunks,
        "cow_chunks": s.cow_chunks,
        "mirrored_writes": s.mirrored_writes,
        "tracked_writes": s.tracked_writes,
        "ahead_writes": s.ahead_writes,
        "parked": s.parked,
        "dest_errors": s.dest_errors,
        "dest_down": s.dest_down,
        "reconnects": reconnects,
        "writes": "mirrored" if auto.writes_mirrored else "tracked",
        "fallbacks": auto.fallbacks,
        "mirror_returns": auto.mirror_returns,
        "mirror_wait_ms": (
            None if auto.mirror_wait_ms is None else round(auto.mirror_wait_ms, 4)
        ),
        "bytes_matched": s.bytes_matched,
        "busy_depth": o.busy_depth,
        "yielded_seconds": round(s.yield_ns / 1e9, 3),
        # where the guest's requests waited on the migration, in all (seconds): parked on a
        # chunk being copied, for the destination after the source was done, parked by a pause
        "guest_waits": {
            "chunk": round(s.chunk_wait_ns / 1e9, 4),
            "destination": round(s.mirror_wait_ns / 1e9, 4),
            "pause": round(s.pause_wait_ns / 1e9, 4),
        },
        "resumed": o.resumed,
        "paused": paused,
        "rate": round(rate),
        "eta_seconds": None if to_go is None else round(to_go, 1),
        "elapsed": round(end - progress.started, 3),
        # the migration's own time: start to cutover (elapsed also counts the stall
        # measurement after it)
        "cutover_after": (
            None if progress.cutover_after is None else round(progress.cutover_after, 3)
        ),
        "started_at": progress.created,
        "speed": speed,
        "no_cutover": o.no_cutover,
        "verify": o.verify,
        "verify_mismatches": verify_mismatches,
        "max_latency_ms": ms(s.max_latency_ns),
        # guest I/O paused around the switch (0 in mirror mode; in DBT and snapshot mode part
        # of the final pause), and the slowest guest request within a second of the switch
        "cutover_pause_ms": ms(s.cutover_pause_ns) if cut_over else None,
        "cutover_stall_ms": ms(cutover_stall_ns),
        "final_pause_ms": ms(final_pause_ns),
        "error": error,
        "io": io,
    }
