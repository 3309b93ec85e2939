"""A slow destination: the load at a fixed 2000 IOPS while the disk moves to a destination
whose every write waits SLOW_WRITE_MS, remote (nbdkit's delay filter over a unix socket)
and local (dm-delay over a loop device, the image served with O_DIRECT).  Mirror mode
makes the guest wait for the destination; auto mode falls back to dirty tracking (its
fallbacks are counted).  The windows are those of :mod:`.under_load`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ublkmig.bench.fio import FioJob
from ublkmig.bench.scenarios.common import MiB, Settings, make_image, say
from ublkmig.bench.scenarios.under_load import combine, load_jobs, load_run

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
                return load_run(s, job, mode, image, server.uri, work, dest_file=dest)
            finally:
                server.stop()
        with open(dest, "wb") as f:
            f.truncate(size)
        with delayed_disk(dest, SLOW_WRITE_MS) as disk:
            return load_run(s, job, mode, image, disk, work, direct=True)
    finally:
        dest.unlink(missing_ok=True)
