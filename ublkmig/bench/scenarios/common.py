"""What every scenario shares: the run's settings, the images and their byte-for-byte
check, the bench's migration request, following a migration's phases, and the
median/min/max summary of repetitions.

Nothing here measures by itself: it starts migrations through the daemon's client
(:mod:`ublkmig.client`) and samples their status, as a user's tools would.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ublkmig.client import Client, MigrateRequest
from ublkmig.migration.phase import ENDED

MiB = 1 << 20
CHUNK = "1M"  # the migrations' chunk size, and dd's block size
CHUNK_BYTES = 1 << 20
MODES = ("mirror", "dbt", "snapshot")


class IntegrityError(AssertionError):
    """A destination differs from the device it was migrated from."""


@dataclass(frozen=True)
class Settings:
    """How big and how long: the full run, or ``--quick`` (the CI smoke run)."""

    quick: bool
    size: int  # the disk
    runtime: float  # fio seconds measured per data-path run
    ramp: float
    reps: int  # repetitions (the median is reported, with min and max)
    queues: tuple[int, ...]
    kublk: bool  # compare with kublk (needs .cache/kublk/kublk)
    load_window: float  # seconds of load before and after a migration
    load_span: int  # load scenario: fio writes over the first load_span bytes
    peer_timeout: float  # QEMU's mirror: give up (not converged) after this long

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick, 128 * MiB, 2.0, 1.0, 1, (1,), True, 2.0, 32 * MiB, 30.0)
        return cls(quick, 1024 * MiB, 4.0, 1.0, 3, (1, 2), True, 5.0, 128 * MiB, 45.0)


def say(text: str) -> None:
    print(text, flush=True)


def run_ok(*argv: str, timeout: float = 600.0) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def make_image(path: Path, size: int, *, data_every: int = 1) -> None:
    """``size`` bytes of random data; with data_every=n only one MiB in n holds data (the
    rest are holes)."""
    with open(path, "wb") as f:
        f.truncate(size)
    if data_every == 1:
        run_ok("dd", "if=/dev/urandom", f"of={path}", "bs=4M", f"count={size // (4 * MiB)}",
               "conv=notrunc", "status=none")  # fmt: skip
        return
    with open(path, "r+b") as f:
        for off in range(0, size, data_every * MiB):
            f.seek(off)
            f.write(os.urandom(MiB))


def check_same(device: str, dest: Path | str, size: int) -> None:
    """The destination equals the device, byte for byte (else IntegrityError, naming the
    first difference).  Compared, not hashed: less CPU for the same proof, which under
    emulation is the scarce resource."""
    subprocess.run(["blockdev", "--flushbufs", device], capture_output=True)
    with open(device, "rb", buffering=0) as fa, open(dest, "rb", buffering=0) as fb:
        off = 0
        while off < size:
            n = min(4 * MiB, size - off)
            x, y = _read_full(fa, n), _read_full(fb, n)
            if x != y:
                first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]),
                             min(len(x), len(y)))  # fmt: skip
                raise IntegrityError(f"{dest} differs from {device} after the migration "
                                     f"(first at byte {off + first})")  # fmt: skip
            off += n


def _read_full(f: BinaryIO, n: int) -> bytes:
    """n bytes from f (IntegrityError if it ends first)."""
    b = f.read(n)
    while len(b) < n:
        more = f.read(n - len(b))
        if not more:
            raise IntegrityError(f"{f.name} ended {n - len(b)} bytes early")
        b += more
    return b


def migrate_request(dest: Path | str, mode: str, yields: bool = True) -> MigrateRequest:
    """The bench's migrations: chunks of CHUNK, no speed limit; the copier yields to guest
    I/O unless ``yields`` is False (--no-yield)."""
    return MigrateRequest(to=str(dest), mode=mode, chunk_size=CHUNK_BYTES, yields=yields)


def start_migration(device: str, dest: Path | str, mode: str, yields: bool = True) -> None:
    Client(device, timeout=30.0).migrate(migrate_request(dest, mode, yields))


@dataclass
class PhaseLog:
    """The migration's phases as the harness saw them (status sampled every 50 ms)."""

    t0: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)  # (seconds since t0, label)

    def note(self, label: str) -> None:
        if not self.events or self.events[-1][1] != label:
            self.events.append((round(time.time() - self.t0, 3), label))


# How often the harness asks the daemon for its status while it watches.  A status costs the
# daemon and the harness CPU (under emulation some 30 ms of wall time each, with the guest's
# load on): asked every 50 ms, it took a fifth to two fifths of the guest's IOPS
# (ci/exp/observer-cost.sh), which the bench then charged to the migration.  So twice a
# second, as `migrate --wait` does; and a load run asks as often before and after the migration
# (watch()), so every window it compares pays the same.
WATCH_INTERVAL = 0.5


def follow(device: str, log: PhaseLog, timeout: float = 3600.0) -> dict[str, Any]:
    """Sample the migration every WATCH_INTERVAL until it ends; its final status."""

    def note(mig: dict[str, Any]) -> None:
        label = mig["phase"]
        if mig.get("paused"):
            label += " (paused)"
        elif mig.get("pass_kind") and mig["phase"] not in ENDED:
            label += f" pass {mig['pass']} ({mig['pass_kind']})"
        log.note(label)

    return Client(device, timeout=30.0).wait_migration(interval=WATCH_INTERVAL, timeout=timeout,
                                                       on_status=note)  # fmt: skip


def watch(device: str, seconds: float) -> None:
    """Ask for the device's status every WATCH_INTERVAL for ``seconds``, as follow() does
    during a migration: the observer's cost in the windows before and after it."""
    client, end = Client(device, timeout=30.0), time.monotonic() + seconds
    while True:
        client.status()
        left = end - time.monotonic()
        time.sleep(max(0.0, min(WATCH_INTERVAL, left)))
        if left <= WATCH_INTERVAL:
            return


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip
