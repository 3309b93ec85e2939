"""The benchmark's scenarios.  Each runs on a machine with a ublk driver (the kernel VM
when the host has none) and returns plain data for results.json.

- ``datapath``: fio against the backing file, ublkmig serving it, and kublk serving it.
- ``idle``: each migration mode on an idle disk (full of data, and mostly sparse) against
  ``dd`` of the same image with the same block size.
- ``load``: each migration mode while fio writes (unthrottled, rate-limited, 70/30 mix):
  guest IOPS and latency before, during and after; the cutover stall or final pause.
- ``qemu``: the same load while QEMU's blockdev-mirror moves the disk (the peer), through
  qemu-storage-daemon's NBD export and the kernel's NBD client.

Every migration run ends with the destination compared with the device byte for byte;
a difference raises :class:`IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ublkmig.bench import fio, targets
from ublkmig.bench.fio import FioJob
from ublkmig.client import Client, MigrateRequest
from ublkmig.migration.phase import ENDED

MiB = 1 << 20
CHUNK = "1M"  # the migrations' chunk size, and dd's block size
CHUNK_BYTES = 1 << 20
MODES = ("mirror", "dbt", "snapshot")


PEER_DIFFERENCES = (
    "What differs: ublkmig serves the disk through ublk (/dev/ublkbN, one queue, its own "
    "data plane in the daemon) and migrates inside that process; QEMU's set-up is "
    "qemu-storage-daemon exporting the disk over NBD on a unix socket, reached by the "
    "kernel's NBD client (/dev/nbdN, one connection), with blockdev-mirror moving it to "
    "the same tmpfs.  The guest's path to the disk is therefore different (NBD socket "
    "round trips against ublk's shared-memory commands), so compare each side's "
    "during/before ratio and migration time more than absolute IOPS.  QEMU's copy-mode "
    "background mirrors writes only to already copied areas asynchronously and "
    "converges by re-copying dirty ones; write-blocking mirrors every write "
    "synchronously (ublkmig's mirror mode is the closer match).  The cutover of QEMU "
    "is the time from block-job-complete to the job's completion."
)


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


# ---- shared helpers ------------------------------------------------------------------------


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


def sha256(path: str | Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        left = length
        while left:
            b = f.read(min(left, 4 * MiB))
            if not b:
                raise IntegrityError(f"{path} ended {left} bytes early")
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def check_same(device: str, dest: Path, size: int) -> str:
    """The destination equals the device, byte for byte (else IntegrityError)."""
    subprocess.run(["blockdev", "--flushbufs", device], capture_output=True)
    a, b = sha256(device, size), sha256(dest, size)
    if a != b:
        raise IntegrityError(f"{dest} differs from {device} after the migration")
    return a


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


def follow(device: str, log: PhaseLog, timeout: float = 3600.0) -> dict[str, Any]:
    """Sample the migration every 50 ms until it ends; its final status."""

    def note(mig: dict[str, Any]) -> None:
        label = mig["phase"]
        if mig.get("paused"):
            label += " (paused)"
        elif mig.get("pass_kind") and mig["phase"] not in ENDED:
            label += f" pass {mig['pass']} ({mig['pass_kind']})"
        log.note(label)

    return Client(device, timeout=30.0).wait_migration(interval=0.05, timeout=timeout,
                                                       on_status=note)  # fmt: skip


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


# ---- 1. data path --------------------------------------------------------------------------


def datapath_jobs(s: Settings, queues: int) -> list[FioJob]:
    def job(name: str, rw: str, bs: str, qd: int) -> FioJob:
        return FioJob(f"{name}-q{queues}", rw, bs, qd, numjobs=queues, runtime=s.runtime,
                      ramp=s.ramp)  # fmt: skip

    jobs = [job("randread-4k-qd32", "randread", "4k", 32),
            job("randwrite-4k-qd32", "randwrite", "4k", 32)]  # fmt: skip
    if not s.quick:
        jobs += [job("randread-4k-qd1", "randread", "4k", 1),
                 job("randwrite-4k-qd1", "randwrite", "4k", 1),
                 job("read-1m-qd8", "read", "1M", 8),
                 job("write-1m-qd8", "write", "1M", 8)]  # fmt: skip
    return jobs


def datapath(s: Settings, work: Path, features: dict[str, Any]) -> dict[str, Any]:
    """fio against the file, ublkmig and kublk; the same jobs, interleaved per repetition
    so drift in the machine's speed spreads over every target alike."""
    image = work / "datapath.img"
    make_image(image, s.size)
    rows: list[dict[str, Any]] = []
    for queues in s.queues:
        kinds: list[tuple[str, Callable[[], Any]]] = [("raw file", lambda: targets.raw(image))]
        # O_DIRECT on the file, as fio's raw runs and kublk's loop target
        kinds.append(("ublkmig", lambda q=queues: targets.ublkmig(
            image, queues=q, depth=128, direct=True, log=work / "serve.log")))  # fmt: skip
        if s.kublk:
            for mode in targets.KUBLK_MODES:
                if mode in features.get("data_paths", []) or mode == "copy":
                    kinds.append((f"kublk {mode}", lambda q=queues, m=mode: targets.kublk(
                        image, queues=q, depth=128, mode=m)))  # fmt: skip
        jobs = datapath_jobs(s, queues)
        per: dict[tuple[str, str], list[fio.FioResult]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        rss: dict[str, int] = {}  # the server's peak resident memory, over the repetitions
        names: dict[str, str] = {}
        for rep in range(s.reps):
            # each server started once per repetition, every job run against it
            for kind, make in kinds:
                with make() as tgt:
                    names[kind] = tgt.name
                    for job in jobs:
                        c0 = tgt.cpu_seconds()
                        r = fio.run(job, tgt.path, work)
                        c1 = tgt.cpu_seconds()
                        per.setdefault((job.name, kind), []).append(r)
                        if tgt.pid is not None and r.ios:
                            # the ramp's I/O counts too: an upper bound (see the report)
                            cpu.setdefault((job.name, kind), []).append((c1 - c0) / r.ios * 1e6)
                    peak = tgt.peak_rss()
                    if peak is not None:
                        rss[kind] = max(rss.get(kind, 0), peak)
                say(f"{queues} queue(s), repetition {rep + 1}/{s.reps}, {tgt.name}: "
                    + ", ".join(f"{j.name} {per[(j.name, kind)][-1].iops:.0f}" for j in jobs))
        for job in jobs:
            for kind, _ in kinds:
                rows.append(_datapath_row(job, queues, names[kind], kind, per[(job.name, kind)],
                                          cpu.get((job.name, kind)), rss.get(kind)))  # fmt: skip
            say(_datapath_line(rows, job.name))
    image.unlink()
    return {"rows": rows}


def _datapath_row(job: FioJob, queues: int, name: str, kind: str, results: list[fio.FioResult],
                  cpu: list[float] | None, peak_rss: int | None = None) -> dict[str, Any]:
    def med(get: Callable[[fio.FioResult], float]) -> float:
        return statistics.median(get(r) for r in results)

    d = "read" if results[0].read else "write"
    return {
        "job": job.name, "queues": queues, "target": name, "kind": kind,
        "iops": summary([r.iops for r in results]),
        "mbps": med(lambda r: r.mbps),
        "lat_mean_us": med(lambda r: getattr(r, d)["lat_mean_us"]),
        "lat_p99_us": med(lambda r: getattr(r, d)["lat_p99_us"]),
        "lat_p99.9_us": med(lambda r: getattr(r, d)["lat_p99.9_us"]),
        "server_cpu_us_per_io": statistics.median(cpu) if cpu else None,
        "server_peak_rss": peak_rss,  # after every job of the repetitions (VmHWM)
        "fio": [r.argv for r in results][:1],
    }  # fmt: skip


def _datapath_line(rows: list[dict[str, Any]], job: str) -> str:
    mine = [r for r in rows if r["job"] == job]
    return f"{job}: " + ", ".join(f"{r['target']} {r['iops']['median']:.0f} IOPS" for r in mine)


# ---- 2. idle migration ---------------------------------------------------------------------


def dd_seconds(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    run_ok("dd", f"if={src}", f"of={dst}", f"bs={CHUNK}", "status=none")
    took = time.monotonic() - t0
    dst.unlink()
    return took


def idle(s: Settings, work: Path) -> dict[str, Any]:
    """Each mode on an idle disk, full of data and 1/8 data (sparse), against dd."""
    out: dict[str, Any] = {"disks": []}
    for label, every in (("full", 1), ("sparse 1/8", 8)):
        image, dest = work / "idle.img", work / "idle-dest.img"
        make_image(image, s.size, data_every=every)
        allocated = os.stat(image).st_blocks * 512
        dd: list[float] = []
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for _rep in range(s.reps):
            dd.append(dd_seconds(image, dest))
            for mode in MODES:
                with targets.ublkmig(image, queues=1, depth=128, log=work / "serve.log") as t:
                    start_migration(t.path, dest, mode)
                    mig = follow(t.path, PhaseLog())
                    if mig["phase"] != "completed":
                        raise RuntimeError(f"idle {mode} migration {mig['phase']}: "
                                           f"{mig['error']}")  # fmt: skip
                    check_same(t.path, dest, s.size)
                runs[mode].append(mig)
                dest.unlink()
        dd.append(dd_seconds(image, dest))
        disk = {"disk": label, "size": s.size, "allocated": allocated, "dd_bs": CHUNK,
                "dd_seconds": summary(dd), "modes": {}}  # fmt: skip
        for mode, migs in runs.items():
            secs = [m["cutover_after"] for m in migs]
            disk["modes"][mode] = {
                "seconds": summary(secs),
                "vs_dd": statistics.median(secs) / min(dd),
                "bytes_copied": migs[0]["bytes_copied"],
                "bytes_skipped": migs[0]["bytes_skipped"],
                "final_pause_ms": migs[0]["final_pause_ms"],
                "cutover_stall_ms": migs[0]["cutover_stall_ms"],
            }  # fmt: skip
            say(f"idle {label} {mode}: {statistics.median(secs):.2f} s "
                f"({disk['modes'][mode]['vs_dd']:.2f}x dd), "
                f"{migs[0]['bytes_copied'] / MiB:.0f} MiB copied")  # fmt: skip
        out["disks"].append(disk)
        image.unlink()
    return out


# ---- 3. migration under load ---------------------------------------------------------------


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
    """Per window: IOPS (every I/O) and write latency percentiles (ms)."""
    out = {}
    for name, (a, b) in spans.items():
        n = sum(1 for t, _, _ in samples if a <= t < b)
        lats = sorted(lat for t, lat, w in samples if a <= t < b and w)
        if not n or b <= a:
            out[name] = {"iops": 0.0}
            continue
        out[name] = {"iops": n / (b - a), **_percentiles(lats)}
    return out


def _percentiles(lats: list[float]) -> dict[str, float]:
    if not lats:
        return {}

    def pct(p: float) -> float:
        return lats[min(len(lats) - 1, int(p / 100 * len(lats)))] / 1000.0

    return {"lat_p50_ms": pct(50), "lat_p99_ms": pct(99), "lat_p99.9_ms": pct(99.9),
            "lat_max_ms": lats[-1] / 1000.0}  # fmt: skip


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


@contextmanager
def loaded(job: FioJob, device: str, work: Path) -> Iterator[dict[str, Any]]:
    """fio running ``job`` on ``device`` for the body of the with; on exit, ``samples``:
    every I/O's completion (seconds since ``t0``, latency in µs, whether a write)."""
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


def load(s: Settings, work: Path, peer: bool = False) -> dict[str, Any]:
    """Each mode (or, with peer, QEMU's copy modes) under each load job, ``reps`` times;
    every run starts from the same disk (a pristine copy is put back)."""
    size = min(s.size, 256 * MiB)
    image, dest, pristine = work / "load.img", work / "load-dest.img", work / "pristine.img"
    make_image(pristine, size)
    out: dict[str, Any] = {"size": size, "span": s.load_span, "runs": []}
    for job in load_jobs(s):
        for mode in (("qemu background", "qemu write-blocking") if peer else MODES):
            reps = []
            for _rep in range(s.reps):
                shutil.copyfile(pristine, image)
                one = _qemu_run if peer else _load_run
                reps.append(one(s, job, mode, image, dest, work))
                dest.unlink(missing_ok=True)
            run = combine(reps)
            out["runs"].append(run)
            w = run["windows"]
            say(f"load {job.name} {mode}: {w['before']['iops']:.0f} IOPS before, "
                f"{w['during']['iops']:.0f} during, {w['after']['iops']:.0f} after; "
                f"migration {run['seconds']:.2f} s (medians of {len(reps)})")  # fmt: skip
    image.unlink()
    pristine.unlink()
    return out


SLOW_WRITE_MS = 40  # the slow scenario's destinations: every write waits this long
SLOW_MODES = ("mirror", "auto")
# nbdkit: an export (a file on the same tmpfs, over a unix socket) behind its delay filter;
# dm-delay: a local block device (a loop device on a tmpfs file behind device-mapper's delay
# target), the image served with --direct so the destination is written with O_DIRECT
SLOW_DESTS = ("nbdkit", "dm-delay")


def slow(s: Settings, work: Path) -> dict[str, Any]:
    """The load at a fixed 2000 IOPS while the disk moves to a slow destination, remote
    (nbdkit) and local (dm-delay), whose every write waits SLOW_WRITE_MS.  Mirror mode makes
    the guest wait for it; auto mode falls back to dirty tracking."""
    size = min(s.size, 256 * MiB)
    image, pristine = work / "slow.img", work / "pristine.img"
    make_image(pristine, size)
    job = replace(load_jobs(s)[0], name="randwrite-4k-qd32-2000iops", rate_iops=2000)
    out: dict[str, Any] = {"size": size, "span": s.load_span, "write_delay_ms": SLOW_WRITE_MS,
                           "runs": []}  # fmt: skip
    for kind in SLOW_DESTS:
        for mode in SLOW_MODES:
            reps = []
            for _rep in range(s.reps):
                shutil.copyfile(pristine, image)
                reps.append(_slow_run(s, job, mode, kind, image, work))
            run = combine(reps)
            run["mode"] = f"{mode} to {kind}"
            run["fallbacks"] = reps[0].get("fallbacks")
            out["runs"].append(run)
            w = run["windows"]
            say(f"slow destination ({kind}), {job.name} {mode}: {w['before']['iops']:.0f} "
                f"IOPS before, {w['during']['iops']:.0f} during (p99 "
                f"{w['during'].get('lat_p99_ms', 0):.1f} ms), {w['after']['iops']:.0f} after; "
                f"migration {run['seconds']:.2f} s")  # fmt: skip
    image.unlink()
    pristine.unlink()
    return out


def _slow_run(s: Settings, job: FioJob, mode: str, kind: str, image: Path,
              work: Path) -> dict[str, Any]:  # fmt: skip
    from ublkmig.bench.dm_delay import delayed_disk
    from ublkmig.bench.nbd_server import start_nbd_server

    dest = work / "slow-dest.img"
    size = os.path.getsize(image)
    try:
        if kind == "nbdkit":
            server = start_nbd_server("nbdkit-file", "unix", work, size, file=dest,
                                      extra=["--filter=delay"],
                                      params=[f"delay-write={SLOW_WRITE_MS}ms"])  # fmt: skip
            try:
                return _load_run(s, job, mode, image, server.uri, work, dest_file=dest)
            finally:
                server.stop()
        with open(dest, "wb") as f:
            f.truncate(size)
        with delayed_disk(dest, SLOW_WRITE_MS) as disk:
            return _load_run(s, job, mode, image, disk, work, direct=True)
    finally:
        dest.unlink(missing_ok=True)


def yielding(s: Settings, work: Path) -> dict[str, Any]:
    """The unthrottled load while the disk moves to a file on the same tmpfs, in mirror and
    dbt mode, with the copier yielding to guest I/O (the default: while the guest has
    requests in flight, one source read at a time and a rest after each) and without
    (--no-yield)."""
    size = min(s.size, 256 * MiB)
    image, dest, pristine = work / "yield.img", work / "yield-dest.img", work / "pristine.img"
    make_image(pristine, size)
    job = load_jobs(s)[0]
    out: dict[str, Any] = {"size": size, "span": s.load_span, "runs": []}
    for mode in ("mirror", "dbt"):
        for yields in (True, False):
            reps = []
            for _rep in range(s.reps):
                shutil.copyfile(pristine, image)
                reps.append(_load_run(s, job, mode, image, dest, work, yields=yields))
                dest.unlink(missing_ok=True)
            run = combine(reps)
            run["mode"] = f"{mode}, {'yielding' if yields else 'not yielding'}"
            out["runs"].append(run)
            w = run["windows"]
            say(f"yield {job.name} {run['mode']}: {w['before']['iops']:.0f} IOPS before, "
                f"{w['during']['iops']:.0f} during, {w['after']['iops']:.0f} after; "
                f"migration {run['seconds']:.2f} s, held back {run['yielded_seconds'] or 0:.2f}"
                f" s (medians of {len(reps)})")  # fmt: skip
    image.unlink()
    pristine.unlink()
    return out


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
              "yielded_seconds", "daemon_peak_rss"):
        run[k] = med([r.get(k) for r in reps])
    run["converged"] = all(r["converged"] for r in reps)
    return run


def _load_run(s: Settings, job: FioJob, mode: str, image: Path, dest: Path | str,
              work: Path, dest_file: Path | None = None, direct: bool = False,
              yields: bool = True) -> dict[str, Any]:  # fmt: skip
    """One migration under ``job``; ``dest`` a path, or an NBD URI exporting ``dest_file``;
    the image served with O_DIRECT if ``direct``; ``yields``: the copier's --no-yield if
    False."""
    with targets.ublkmig(image, queues=1, depth=128, direct=direct,
                         log=work / "serve.log") as t:  # fmt: skip
        with loaded(job, t.path, work) as f:
            log = PhaseLog(t0=f["t0"])
            time.sleep(s.load_window)
            log.note("start")
            start_migration(t.path, dest, mode, yields)
            mig = follow(t.path, log)
            time.sleep(s.load_window)
            log.note("end of load")
        mig["daemon_peak_rss"] = t.peak_rss()
        if mig["phase"] != "completed":
            raise RuntimeError(f"{mode} under load {mig['phase']}: {mig['error']}")
        check_same(t.path, dest_file or Path(dest), os.path.getsize(image))
    return _load_result(job, mode, f, log, mig)


def _load_result(job: FioJob, mode: str, f: dict[str, Any], log: PhaseLog,
                 mig: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    ev = dict((label, t) for t, label in reversed(log.events))
    start, stop = ev["start"], ev["end of load"]
    # the migration ends at its cutover (the daemon's clock from the request)
    end = start + mig["cutover_after"]
    spans = {"before": (1.0, start), "during": (start, end), "after": (end, stop)}
    return {
        "job": job.name, "mode": mode, "fio": f["argv"], "seconds": end - start,
        "windows": windows(f["samples"], spans),
        "bytes_copied": mig.get("bytes_copied"), "passes": mig.get("pass"),
        "cutover_pause_ms": mig.get("cutover_pause_ms"),
        "cutover_stall_ms": mig.get("cutover_stall_ms"),
        "final_pause_ms": mig.get("final_pause_ms"),
        "converged": mig.get("phase") == "completed",
        "fallbacks": mig.get("fallbacks"),
        "yielded_seconds": mig.get("yielded_seconds"),
        "daemon_peak_rss": mig.get("daemon_peak_rss"),
        "events": log.events,
        "series": _series(f["samples"], 0.25),
    }  # fmt: skip


def _series(samples: list[Sample], step: float) -> list[tuple[float, float, float]]:
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


def _qemu_run(s: Settings, job: FioJob, mode: str, image: Path, dest: Path,
              work: Path) -> dict[str, Any]:  # fmt: skip
    """The same load on QEMU's NBD export (kernel NBD client, one connection like the one
    queue ublkmig serves with) while blockdev-mirror moves the disk."""
    from ublkmig.bench.qemu_mirror import QemuMirrorPeer, QmpError

    copy_mode = mode.split(" ", 1)[1]
    qsd = work / "qsd"
    qsd.mkdir(exist_ok=True)
    with QemuMirrorPeer(image, qsd, connections=1) as peer:
        assert peer.device is not None
        targets.set_scheduler_none(peer.device)
        with loaded(job, peer.device, work) as f:
            log = PhaseLog(t0=f["t0"])
            time.sleep(s.load_window)
            log.note("start")
            wall = time.time() - time.monotonic()
            try:
                res = peer.mirror(dest, copy_mode, timeout=s.peer_timeout)  # type: ignore[arg-type]
            except QmpError as e:  # not ready in time: the job is cancelled
                say(f"QEMU's mirror ({copy_mode}) did not converge in {s.peer_timeout:.0f} s "
                    f"under {job.name}: {e}")  # fmt: skip
                res = None
                log.note("cancelled")
            else:
                log.events += [(round(t + wall - log.t0, 3), name) for t, name in res.timeline
                               if name in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED")]
                log.note("completed")
            time.sleep(s.load_window)
            log.note("end of load")
        assert peer.proc is not None
        peak_rss = targets.Target("qemu-storage-daemon", peer.device, peer.proc.pid).peak_rss()
        if res is not None and res.error:
            raise RuntimeError(f"QEMU's mirror ({copy_mode}) under load failed: {res.error}")
        if res is not None:
            check_same(peer.device, dest, os.path.getsize(image))
    mig = {"phase": "completed" if res else "cancelled",
           "bytes_copied": res.offset if res else None, "pass": None,
           "cutover_after": res.elapsed if res else s.peer_timeout,
           "cutover_stall_ms": None if res is None or res.cutover is None else res.cutover * 1000,
           "final_pause_ms": None, "daemon_peak_rss": peak_rss}  # fmt: skip
    return _load_result(job, mode, f, log, mig)
