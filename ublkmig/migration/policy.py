"""The policy's knobs and decisions, as plain code (no event loop, no data plane): when the copy
is in sync, when a count of chunks stopped shrinking, and auto mode's switches between
mirroring guest writes and tracking them.  The machine (machine.py) feeds them what it reads
from the data plane and carries out what they decide.
"""

from __future__ import annotations

from dataclasses import dataclass

from ublkmig.native import MigMode, MigStats


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


def in_sync(s: MigStats) -> bool:
    """Every chunk copied and none dirty: with writes mirrored, the cutover needs no pass."""
    return s.dirty_chunks == 0 and s.chunks_copied >= s.nr_chunks


class Stall:
    """Whether a count of chunks left (dirty, or in the active delta) stopped shrinking: it
    did not reach a new low for ``passes`` steps in a row."""

    def __init__(self, passes: int) -> None:
        self.passes = passes
        self.best: int | None = None  # fewest chunks left so far
        self.flat = 0  # steps since

    def stalled(self, left: int) -> bool:
        """One step's count; True once it stalled."""
        if self.best is None or left < self.best:
            self.best, self.flat = left, 0
            return False
        self.flat += 1
        return self.flat >= self.passes

    def reset(self) -> None:
        self.best, self.flat = None, 0


@dataclass(frozen=True)
class Switch:
    """A switch of how guest writes go that auto mode decided: the data plane's mode to set
    (DBT: a fallback, to the source only and tracked; MIRROR: mirrored again, and why)."""

    mode: MigMode
    why: str = ""


class Auto:
    """Auto mode: mirror guest writes, fall back to dirty tracking while the destination is too
    slow, mirror again to converge.  The measure is how long each mirrored write waited for the
    destination after its source part was done (``mirror_wait_ns`` / ``mirror_waits``).

    The machine makes each Switch (set_mode), then reports it here (fell_back,
    mirrored_again).  Mirroring never dirties a chunk, so once mirrored for good it converges
    in a pass; two things make it mirror for good: dirty tracking that does not converge, or
    ``auto_max_fallbacks`` fallbacks.  (Every mode has one: ``writes_mirrored`` says how guest
    writes go, for status.)"""

    def __init__(self, policy: Policy, threshold_ms: float, *, writes_mirrored: bool) -> None:
        self.policy = policy
        self.threshold_ms = threshold_ms  # --fallback-wait
        # the data plane's current mode, switches, the recent mirror wait
        self.writes_mirrored = writes_mirrored
        self.fallbacks = 0
        self.mirror_returns = 0
        self.mirror_wait_ms: float | None = None
        self.done = False  # converged: mirror to the end
        self.final = False  # no more fallbacks: mirror to the end, whatever it costs
        self._over = 0  # samples in a row over the threshold
        self._fell_back_at = 0.0
        self._wait_seen = (0, 0)  # (mirror_waits, mirror_wait_ns) at the last sample
        self._stall = Stall(policy.stall_passes)  # the dirty count after passes while tracked

    def sample(self, s: MigStats, now: float, *, judging: bool) -> Switch | None:
        """Each sample: fall back to dbt while mirrored writes wait too long for the destination
        (over the threshold ``auto_sustain`` samples in a row); mirror again after a while (the
        wait doubles each fallback).  Not ``judging`` (not syncing, paused, cut over), or once
        converged: the wait counters are only taken."""
        p = self.policy
        n0, ns0 = self._wait_seen
        self._wait_seen = (s.mirror_waits, s.mirror_wait_ns)
        if not judging or self.done:
            return None
        if self.writes_mirrored:
            if s.mirror_waits <= n0:
                # none completed: the writes waiting for the destination right now are
                # judged by their wait so far (one that stopped answering shows before any
                # of them completes)
                if not s.dest_waiting:
                    return None  # no mirrored writes this sample: nothing to judge
                self.mirror_wait_ms = s.dest_waiting_ns / 1e6
            else:
                self.mirror_wait_ms = (s.mirror_wait_ns - ns0) / (s.mirror_waits - n0) / 1e6
            over = self.mirror_wait_ms > self.threshold_ms
            self._over = self._over + 1 if over else 0
            if self._over >= p.auto_sustain and not self.final:
                return Switch(MigMode.DBT)
            return None
        probe = min(p.auto_probe * 2 ** (self.fallbacks - 1), p.auto_probe_max)
        if now - self._fell_back_at >= probe:
            return Switch(MigMode.MIRROR, f"{probe:g} s after the fallback")
        return None

    def converged(self, s: MigStats) -> bool:
        """Before each pass: writes mirrored and nothing left to copy (then the samples stop
        judging: mirror to the end)."""
        if self.writes_mirrored and in_sync(s):
            self.done = True
            return True
        return False

    def after_pass(self, s: MigStats) -> Switch | None:
        """Before each pass (not converged): while tracked, mirror again when few chunks are
        dirty, or for good when the first copy is done and the dirty count did not shrink for
        ``stall_passes`` passes."""
        if self.writes_mirrored:
            self._stall.reset()
            return None
        if s.dirty_chunks <= self.policy.dirty_threshold:
            return Switch(MigMode.MIRROR, "few dirty chunks left")
        if s.chunks_copied >= s.nr_chunks and self._stall.stalled(s.dirty_chunks):
            # (copied once: these were dirty passes.)  The guest dirties chunks as fast as
            # the copier cleans them: only mirroring (the guest waiting on the destination)
            # gets there.
            self.final = True
            return Switch(MigMode.MIRROR, "dirty tracking is not converging")
        return None

    def destination_lost(self) -> Switch | None:
        """The destination's connections are lost: track the guest's writes on the source while
        it is away (unless mirroring for good)."""
        if self.writes_mirrored and not self.final:
            return Switch(MigMode.DBT)
        return None

    def fell_back(self, now: float) -> None:
        self.writes_mirrored = False
        self.fallbacks += 1
        self._over = 0
        self._fell_back_at = now

    def mirrored_again(self) -> None:
        self.writes_mirrored = True
        self.mirror_returns += 1
        self._over = 0
        if self.fallbacks >= self.policy.auto_max_fallbacks:
            self.final = True
