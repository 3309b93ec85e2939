"""Two (or more) builds of the data plane under the same load in one boot: the load
scenario's migrations (:func:`ublkmig.bench.scenarios.load_run`: fio's load with its
latency log and verifying writer, the byte-for-byte check), each build loaded through
``$UBLKMIG_NATIVE_LIB``, the runs interleaved build by build so that a slow spell of the
machine falls on all of them.  Under emulation only such ratios mean anything.

Runs where a ublk driver is (the kernel VM: ``ci/ab-load`` builds an older revision and
starts it there)::

    python -m ublkmig.bench.ab --lib old=PATH.so --lib new=built --mode mirror --reps 3

Prints a JSON line per run, then a table of medians per load, mode and build.  A first run
(not reported) warms the machine up: the first migration of a boot is the slowest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ublkmig.bench import scenarios
from ublkmig.bench.scenarios.common import MiB, Settings, make_image
from ublkmig.native.library import ENV_LIB

WORKDIR = Path("/run/ublkmig-bench")


def row(lib: str, run: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: IOPS before and during, their ratio, the migration's time, write
    p99 before and during, the pause and the cutover's stall, where the guest waited (shares
    of its request time during the migration) and the daemon's CPU per guest I/O."""
    w = run["windows"]
    before, during = w["before"], w["during"]
    waits, busy = run.get("guest_waits") or {}, during.get("request_seconds") or 0.0
    pause = run["final_pause_ms"] if run["final_pause_ms"] is not None else \
        run.get("cutover_pause_ms")  # fmt: skip
    return {
        "lib": lib, "job": run["job"], "mode": run["mode"],
        "iops_before": before["iops"], "iops_during": during["iops"],
        "ratio": during["iops"] / before["iops"] if before["iops"] else None,
        "seconds": run["seconds"], "pause_ms": pause, "stall_ms": run.get("cutover_stall_ms"),
        "p99_before_ms": before.get("lat_p99_ms"), "p99_during_ms": during.get("lat_p99_ms"),
        **{f"waited_{k}": waits[k] / busy if busy else None for k in waits},
        **{f"cpu_us_{k}": v for k, v in (run.get("cpu_us_per_io") or {}).items()},
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """Medians per (load, mode, build), in the order first seen."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["job"], r["mode"], r["lib"]), []).append(r)

    def med(rs: list[dict[str, Any]], key: str, fmt: str, scale: float = 1.0) -> str:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return format(scale * statistics.median(vals), fmt) if vals else "-"

    out = ["| load | mode | build | runs | during/before | seconds | p99 ms before / during "
           "| pause (stall) ms | waited %: chunk / dest / pause | CPU µs/IO before / during |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for (job, mode, lib), rs in groups.items():
        waited = " / ".join(med(rs, f"waited_{k}", ".0f", 100.0)
                            for k in ("chunk", "destination", "pause"))  # fmt: skip
        out.append(
            f"| {job} | {mode} | {lib} | {len(rs)} | {med(rs, 'ratio', '.2f')} "
            f"| {med(rs, 'seconds', '.1f')} | {med(rs, 'p99_before_ms', '.1f')} / "
            f"{med(rs, 'p99_during_ms', '.1f')} | {med(rs, 'pause_ms', '.0f')} "
            f"({med(rs, 'stall_ms', '.0f')}) | {waited} "
            f"| {med(rs, 'cpu_us_before', '.0f')} / {med(rs, 'cpu_us_during', '.0f')} |"
        )
    return "\n".join(out)


def _libs(specs: Sequence[str]) -> list[tuple[str, str | None]]:
    """NAME=PATH pairs; PATH ``built`` is the package's own build (None)."""
    out: list[tuple[str, str | None]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lib {spec}: give NAME=PATH (PATH 'built': this package's)")
        if path != "built" and not Path(path).is_file():
            raise SystemExit(f"--lib {spec}: {path} is not a file")
        out.append((name, None if path == "built" else str(Path(path).resolve())))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ublkmig.bench.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", required=True, metavar="NAME=PATH",
                    help="a build of the data plane (PATH 'built': the package's own)")
    ap.add_argument("--mode", action="append", choices=["auto", *scenarios.MODES],
                    help="(repeatable; default: every mode)")
    ap.add_argument("--job", action="append",
                    help="the load scenario's jobs by name (default: unthrottled 4k writes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256, help="the disk (default 256)")
    a = ap.parse_args(argv)  # fmt: skip
    libs = _libs(a.lib)
    modes = a.mode or ["auto", *scenarios.MODES]
    s = Settings.make(False)
    jobs = {j.name: j for j in scenarios.load_jobs(s)}
    names = a.job or ["randwrite-4k-qd32"]
    unknown = [n for n in names if n not in jobs]
    if unknown:
        raise SystemExit(f"unknown job {', '.join(unknown)}: choose from {', '.join(jobs)}")
    size = a.size_mib * MiB
    WORKDIR.mkdir(exist_ok=True)
    # room for the images and snapshot mode's deltas (up to six generations)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={6 * size + (512 << 20)}", "tmpfs",
                    str(WORKDIR)], check=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(dir=WORKDIR))
    pristine, image, dest = work / "pristine.img", work / "disk.img", work / "dest.img"
    rows: list[dict[str, Any]] = []
    try:
        make_image(pristine, size)

        def one(lib: str | None, job: str, mode: str) -> dict[str, Any]:
            if lib is None:
                os.environ.pop(ENV_LIB, None)
            else:
                os.environ[ENV_LIB] = lib
            shutil.copyfile(pristine, image)
            try:
                return scenarios.load_run(s, jobs[job], mode, image, dest, work)
            finally:
                dest.unlink(missing_ok=True)

        one(libs[-1][1], names[0], modes[0])  # the warm-up
        for _rep in range(a.reps):
            for job in names:
                for mode in modes:
                    for name, lib in libs:
                        r = row(name, one(lib, job, mode))
                        rows.append(r)
                        print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["umount", str(WORKDIR)], capture_output=True)
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
