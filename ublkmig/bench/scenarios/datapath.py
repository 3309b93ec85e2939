"""The data path: fio against the backing file (O_DIRECT), ``ublkmig serve`` and kublk
(the kernel selftest's ublk server, in each data path the kernel offers) serving it.

The same jobs (4k random read and write at queue depth 32; in the full run also depth 1
and 1M sequential) run against every target, interleaved per repetition so drift in the
machine's speed spreads over every target alike.  Per job and target: IOPS (median, min,
max), bandwidth, latency, the server's CPU time per I/O and its peak resident memory.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ublkmig.bench import fio, targets
from ublkmig.bench.fio import FioJob
from ublkmig.bench.scenarios.common import Settings, make_image, say, summary


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
