"""Measuring a migration under load, shared by the load, slow, yield and qemu scenarios.

fio runs a write load with a latency log of every I/O (Unix time, on the harness's own
clock) beside a slow verifying writer past the load's span (bad data raises
:class:`IntegrityError`).  The harness notes the migration's phases on the same clock, so
a run is cut into windows (before, during, after: IOPS and write latency percentiles) and a
series for the plot; repetitions are combined into medians with their spread.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ublkmig.bench import fio, targets
from ublkmig.bench.fio import FioJob
from ublkmig.bench.scenarios.common import (
    IntegrityError,
    MiB,
    PhaseLog,
    Settings,
    check_same,
    follow,
    start_migration,
    summary,
    watch,
)
from ublkmig.units import parse_size


def load_jobs(s: Settings) -> list[FioJob]:
    base = FioJob("randwrite-4k-qd32", "randwrite", "4k", 32, runtime=3600, ramp=0,
                  size=s.load_span, lat_log=True)  # fmt: skip
    jobs = [base]
    if not s.quick:
        jobs += [replace(base, name="randwrite-4k-qd32-2000iops", rate_iops=2000),
                 replace(base, name="randrw70-4k-qd32", rw="randrw", rwmixread=70)]  # fmt: skip
    return jobs


Sample = tuple[float, float, bool]  # (seconds since the load started, latency us, a write)


def windows(samples: list[Sample], spans: dict[str, tuple[float, float]]
            ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per window: IOPS (every I/O), the writes, and write latency percentiles (ms)."""
    out = {}
    for name, (a, b) in spans.items():
        n = sum(1 for t, _, _ in samples if a <= t < b)
        lats = sorted(lat for t, lat, w in samples if a <= t < b and w)
        if not n or b <= a:
            out[name] = {"iops": 0.0}
            continue
        # the guest's request time in the window (the sum of every I/O's latency, s): what
        # the migration's waits (guest_waits) are a share of
        busy = sum(lat for t, lat, _ in samples if a <= t < b) / 1e6
        out[name] = {"iops": n / (b - a), "writes": len(lats), "request_seconds": busy,
                     **_percentiles(lats)}  # fmt: skip
    return out


def _percentiles(lats: list[float]) -> dict[str, float]:
    if not lats:
        return {}

    def pct(p: float) -> float:
        return lats[min(len(lats) - 1, int(p / 100 * len(lats)))] / 1000.0

    return {"lat_p50_ms": pct(50), "lat_p99_ms": pct(99), "lat_p99.9_ms": pct(99.9),
            "lat_max_ms": lats[-1] / 1000.0}  # fmt: skip


def series(samples: list[Sample], step: float) -> list[tuple[float, float, float]]:
    """(time, IOPS, p99 write latency ms) per ``step`` seconds, for the plot."""
    buckets: dict[int, list[Sample]] = {}
    for smp in samples:
        buckets.setdefault(int(smp[0] / step), []).append(smp)
    out = []
    for k in sorted(buckets):
        lats = sorted(lat for _, lat, w in buckets[k] if w)
        p99 = lats[min(len(lats) - 1, int(0.99 * len(lats)))] / 1000.0 if lats else 0.0
        out.append((round(k * step, 3), len(buckets[k]) / step, p99))
    return out


SENTINEL = 8 * MiB


def sentinel_argv(device: str, offset: int, work: Path) -> list[str]:
    """A slow writer over the SENTINEL bytes at ``offset`` (past the load) that reads back
    and checks (crc32c) what it wrote, all through the migration and after it."""
    return ["fio", "--name=sentinel", f"--filename={device}", f"--offset={offset}",
            f"--size={SENTINEL}", "--rw=write", "--bs=4k", "--iodepth=4", "--ioengine=io_uring",
            "--direct=1", "--verify=crc32c", "--verify_backlog=32", "--loops=1000000",
            "--rate_iops=100", "--output-format=json", f"--output={work / 'sentinel.json'}"]


def _interrupt(proc: subprocess.Popen[str]) -> str:
    """SIGINT (fio ends its jobs and writes its logs); its stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=300)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1] + "\n(killed: it did not stop on SIGINT)"


def _device_ios(device: str) -> int | None:
    """Reads and writes the block device has completed (None: not a block device)."""
    try:
        f = (Path("/sys/class/block") / Path(device).name / "stat").read_text().split()
    except OSError:
        return None
    return int(f[0]) + int(f[4])


def wait_for_io(device: str, t0: float, ios: int = 256, timeout: float = 60.0) -> float | None:
    """When the load is running (``ios`` more I/Os done on ``device`` than at the call), in
    seconds since ``t0``; None if ``device`` is not a block device.  fio can take seconds to
    start under emulation, and a window of load that starts before it would count that."""
    first = _device_ios(device)
    if first is None:
        return None
    deadline = time.monotonic() + timeout
    while (_device_ios(device) or 0) < first + ios:
        if time.monotonic() > deadline:
            raise fio.FioError(f"fio did not get {ios} I/Os done on {device} in {timeout:.0f} s")
        time.sleep(0.02)
    return time.time() - t0


@contextmanager
def loaded(job: FioJob, device: str, work: Path) -> Iterator[dict[str, Any]]:
    """fio running ``job`` on ``device`` for the body of the with, entered once it has I/O
    done (``io_start``: seconds since ``t0``); on exit, ``samples``: every I/O's completion
    (seconds since ``t0``, latency in µs, whether a write)."""
    out: dict[str, Any] = {}
    for old in work.glob(f"{job.name}_*.log"):
        old.unlink()
    assert job.size is not None
    t0 = time.time()
    proc, argv = fio.start(job, device, work)
    sentinel = subprocess.Popen(sentinel_argv(device, job.size, work), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=work)  # fmt: skip
    out["t0"], out["argv"] = t0, argv
    try:
        out["io_start"] = wait_for_io(device, t0)
        yield out
    finally:
        err, serr = _interrupt(proc), _interrupt(sentinel)
    if "verify" in serr.lower() or "error" in serr.lower():
        raise IntegrityError(f"fio's verifying writer beside the load saw bad data: {serr}")
    logs = sorted(work.glob(f"{job.name}_lat.*.log"))
    if "error" in err.lower() or not logs:
        raise fio.FioError(f"fio {job.name} failed ({proc.returncode}): {err.strip()[-1000:]}")
    samples: list[Sample] = []
    for lg in logs:
        for line in lg.read_text().splitlines():
            p = line.split(",")
            if len(p) >= 3 and p[0].strip().isdigit():
                samples.append((int(p[0]) / 1000.0 - t0, int(p[1]) / 1000.0,
                                p[2].strip() == "1"))  # fmt: skip
        lg.unlink()
    samples.sort()
    out["samples"] = samples


def combine(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetitions of one load run as one: medians of every figure, the spread of the
    time and of the during/before IOPS ratio; the first run's timeline and series (plot)."""
    def med(vals: list[Any]) -> Any:
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    run = dict(reps[0])
    run["reps"] = len(reps)
    run["seconds"] = med([r["seconds"] for r in reps])
    run["seconds_spread"] = summary([r["seconds"] for r in reps])
    ratios = [r["windows"]["during"]["iops"] / r["windows"]["before"]["iops"]
              for r in reps if r["windows"]["before"]["iops"]]  # fmt: skip
    run["during_vs_before"] = summary(ratios) if ratios else None
    run["windows"] = {
        w: {k: med([r["windows"][w].get(k) for r in reps]) for k in reps[0]["windows"][w]}
        for w in reps[0]["windows"]
    }
    for k in ("bytes_copied", "cutover_pause_ms", "cutover_stall_ms", "final_pause_ms",
              "yielded_seconds", "daemon_peak_rss", "written_per_guest_byte"):
        run[k] = med([r.get(k) for r in reps])
    for key in ("guest_waits", "cpu_us_per_io"):
        parts = [r[key] for r in reps if r.get(key)]
        run[key] = {k: med([p.get(k) for p in parts]) for k in parts[0]} if parts else None
    run["converged"] = all(r["converged"] for r in reps)
    return run


def load_run(s: Settings, job: FioJob, mode: str, image: Path, dest: Path | str,
             work: Path, dest_file: Path | None = None, direct: bool = False,
             yields: bool = True) -> dict[str, Any]:  # fmt: skip
    """One migration under ``job``; ``dest`` a path, or an NBD URI exporting ``dest_file``;
    the image served with O_DIRECT if ``direct``; ``yields``: the copier's --no-yield if
    False."""
    with targets.ublkmig(image, queues=1, depth=128, direct=direct,
                         log=work / "serve.log") as t:  # fmt: skip
        with loaded(job, t.path, work) as f:
            log = PhaseLog(t0=f["t0"])
            # the daemon's CPU time at the load's start, the migration's and its end
            marks = [(time.time() - f["t0"], t.cpu_seconds())]
            watch(t.path, s.load_window)
            log.note("start")
            marks.append((time.time() - f["t0"], t.cpu_seconds()))
            start_migration(t.path, dest, mode, yields)
            mig = follow(t.path, log)
            marks.append((time.time() - f["t0"], t.cpu_seconds()))
            watch(t.path, s.load_window)
            log.note("end of load")
        mig["daemon_peak_rss"] = t.peak_rss()
        mig["cpu_marks"] = marks
        if mig["phase"] != "completed":
            raise RuntimeError(f"{mode} under load {mig['phase']}: {mig['error']}")
        check_same(t.path, dest_file or Path(dest), os.path.getsize(image))
    return load_result(job, mode, f, log, mig)


def cpu_per_io(samples: list[Sample], marks: list[tuple[float, float]]) -> dict[str, float]:
    """The daemon's CPU time per guest I/O (µs) before the migration and during it (from
    its start to its end, the phase completed: a second after the cutover), from its CPU
    time at those ``marks`` (seconds since the load started, CPU seconds)."""
    out = {}
    for name, (a, ca), (b, cb) in (("before", marks[0], marks[1]), ("during", marks[1], marks[2])):
        n = sum(1 for t, _, _ in samples if a <= t < b)
        if n:
            out[name] = (cb - ca) / n * 1e6
    return out


def written_per_guest_byte(job: FioJob, during: dict[str, float],
                           mig: dict[str, Any]) -> float | None:  # fmt: skip
    """What the daemon wrote to storage during the migration per byte the guest wrote then:
    the guest's writes themselves (to the source, or a snapshot's delta), their mirrored
    copies on the destination, the copier's chunks, and a snapshot's copies on write."""
    guest = during.get("writes", 0) * parse_size(job.bs)
    if not guest or mig.get("mirrored_writes") is None:
        return None
    extra = (mig["mirrored_writes"] * parse_size(job.bs) + (mig.get("bytes_copied") or 0)
             + (mig.get("cow_chunks") or 0) * (mig.get("chunk_size") or 0))  # fmt: skip
    return (guest + extra) / guest


def load_result(job: FioJob, mode: str, f: dict[str, Any], log: PhaseLog,
                mig: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One run's figures: its windows (split at the start and the cutover), the migration's
    status, its phases and the series for the plot."""
    ev = dict((label, t) for t, label in reversed(log.events))
    start, stop = ev["start"], ev["end of load"]
    # the migration ends at its cutover (the daemon's clock from the request)
    end = start + mig["cutover_after"]
    # before: from the load's start (or a second in, if not known) to the migration's
    begin = f.get("io_start") or 1.0
    spans = {"before": (begin, start), "during": (start, end), "after": (end, stop)}
    win = windows(f["samples"], spans)
    return {
        "job": job.name, "mode": mode, "fio": f["argv"], "seconds": end - start,
        "windows": win,
        "written_per_guest_byte": written_per_guest_byte(job, win["during"], mig),
        "bytes_copied": mig.get("bytes_copied"), "passes": mig.get("pass"),
        "cutover_pause_ms": mig.get("cutover_pause_ms"),
        "cutover_stall_ms": mig.get("cutover_stall_ms"),
        "final_pause_ms": mig.get("final_pause_ms"),
        "converged": mig.get("phase") == "completed",
        "fallbacks": mig.get("fallbacks"),
        "yielded_seconds": mig.get("yielded_seconds"),
        "guest_waits": mig.get("guest_waits"),
        "cpu_us_per_io": cpu_per_io(f["samples"], mig["cpu_marks"]) if "cpu_marks" in mig
        else None,
        "daemon_peak_rss": mig.get("daemon_peak_rss"),
        "events": log.events,
        "series": series(f["samples"], 0.25),
    }  # fmt: skip
