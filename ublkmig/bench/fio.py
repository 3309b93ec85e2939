"""fio jobs for the benchmark: the exact command line, and the figures from fio's JSON.

Every job is time based with a ramp (warm-up) before the measured time, a fixed random
seed (``randrepeat``, ``randseed``), ``direct=1`` on io_uring, and the latency
percentiles the report quotes.  The command line is kept with each result, so a figure
in the report can be reproduced by hand.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = ("50", "99", "99.9")
SEED = 0x5EED


class FioError(RuntimeError):
    """fio failed, or reported an I/O error."""


@dataclass(frozen=True)
class FioJob:
    """One fio workload (one group: ``numjobs`` threads reported together)."""

    name: str
    rw: str  # randread, randwrite, read, write, randrw
    bs: str  # "4k", "1M"
    iodepth: int
    numjobs: int = 1
    runtime: float = 10.0  # measured seconds
    ramp: float = 2.0  # warm-up seconds, not measured
    size: int | None = None  # bytes of the file/device to use (default: all of it)
    rwmixread: int | None = None  # randrw: percent reads
    rate_iops: int | None = None  # per job; None: as fast as it goes
    lat_log: bool = False  # log every I/O: completion time (Unix ms), latency (NAME_lat.N.log)

    def argv(self, filename: str, outdir: Path) -> list[str]:
        a = [
            "fio", f"--name={self.name}", f"--filename={filename}", f"--rw={self.rw}",
            f"--bs={self.bs}", f"--iodepth={self.iodepth}", f"--numjobs={self.numjobs}",
            "--ioengine=io_uring", "--direct=1", "--time_based",
            f"--runtime={self.runtime:g}s", f"--ramp_time={self.ramp:g}s",
            "--randrepeat=1", f"--randseed={SEED}", "--norandommap", "--group_reporting",
            f"--percentile_list={':'.join(PERCENTILES)}", "--output-format=json",
            f"--output={outdir / (self.name + '.json')}",
        ]  # fmt: skip
        if self.size is not None:
            a.append(f"--size={self.size}")
        if self.rwmixread is not None:
            a.append(f"--rwmixread={self.rwmixread}")
        if self.rate_iops is not None:
            a.append(f"--rate_iops={self.rate_iops}")
        if self.lat_log:
            a += [f"--write_lat_log={outdir / self.name}", "--log_unix_epoch=1"]
        return a


@dataclass
class FioResult:
    """The figures of one run: per direction (read, write), plus fio's own CPU use."""

    job: dict[str, Any]
    argv: list[str]
    read: dict[str, float] = field(default_factory=dict)
    write: dict[str, float] = field(default_factory=dict)
    fio_cpu: float = 0.0  # usr + sys percent of one CPU, fio's threads
    seconds: float = 0.0  # measured time (fio's runtime, without the ramp)

    @property
    def iops(self) -> float:
        return self.read.get("iops", 0.0) + self.write.get("iops", 0.0)

    @property
    def mbps(self) -> float:
        return self.read.get("mbps", 0.0) + self.write.get("mbps", 0.0)

    @property
    def ios(self) -> int:
        return int(self.read.get("ios", 0) + self.write.get("ios", 0))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["iops"], d["mbps"] = self.iops, self.mbps
        return d


def _direction(d: dict[str, Any]) -> dict[str, float]:
    if not d.get("total_ios"):
        return {}
    clat = d.get("clat_ns", {}).get("percentile", {})

    def pct(p: str) -> float:
        return float(clat.get(f"{float(p):.6f}", 0.0)) / 1000.0

    return {
        "iops": float(d["iops"]),
        "mbps": float(d["bw_bytes"]) / 1e6,
        "ios": float(d["total_ios"]),
        "lat_mean_us": float(d["lat_ns"]["mean"]) / 1000.0,
        "lat_max_us": float(d["lat_ns"]["max"]) / 1000.0,
        **{f"lat_p{p}_us": pct(p) for p in PERCENTILES},
    }


def parse(job: FioJob, argv: list[str], report: dict[str, Any]) -> FioResult:
    """A FioResult from fio's JSON output (one group)."""
    j = report["jobs"][0]
    if j.get("error"):
        raise FioError(f"fio job {job.name} reported error {j['error']}")
    return FioResult(
        job=asdict(job), argv=argv, read=_direction(j["read"]), write=_direction(j["write"]),
        fio_cpu=float(j.get("usr_cpu", 0.0)) + float(j.get("sys_cpu", 0.0)),
        seconds=float(j.get("job_runtime", 0)) / 1000.0 / max(job.numjobs, 1),
    )  # fmt: skip


def start(job: FioJob, filename: str, outdir: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """Start fio in the background; finish with wait()."""
    argv = job.argv(filename, outdir)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=outdir)  # fmt: skip
    return proc, argv


def wait(job: FioJob, proc: subprocess.Popen[str], argv: list[str], outdir: Path,
         timeout: float | None = None) -> FioResult:  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise FioError(f"fio job {job.name} did not end in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise FioError(f"fio job {job.name} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return parse(job, argv, json.loads((outdir / f"{job.name}.json").read_text()))


def run(job: FioJob, filename: str, outdir: Path) -> FioResult:
    proc, argv = start(job, filename, outdir)
    return wait(job, proc, argv, outdir, timeout=job.runtime + job.ramp + 120)
