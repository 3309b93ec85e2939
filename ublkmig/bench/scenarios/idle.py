"""Idle migration: each mode moves an idle disk, full of data and then 1/8 data (sparse),
to a file on the same tmpfs; the time to its cutover is set against ``dd`` of the same
image with the same block size (the chunk size).  Every destination is compared with
the device byte for byte.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from ublkmig.bench import targets
from ublkmig.bench.scenarios.common import (
    CHUNK,
    MODES,
    MiB,
    PhaseLog,
    Settings,
    check_same,
    follow,
    make_image,
    run_ok,
    say,
    start_migration,
    summary,
)


def dd_seconds(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    run_ok("dd", f"if={src}", f"of={dst}", f"bs={CHUNK}", "status=none")
    took = time.monotonic() - t0
    dst.unlink()
    return took


def idle_migration(image: Path, dest: Path, mode: str, work: Path) -> dict[str, Any]:
    """One migration of ``image``, served and idle, to ``dest`` (a new file, removed after
    the comparison); its final status."""
    with targets.ublkmig(image, queues=1, depth=128, log=work / "serve.log") as t:
        start_migration(t.path, dest, mode)
        mig = follow(t.path, PhaseLog())
        if mig["phase"] != "completed":
            raise RuntimeError(f"idle {mode} migration {mig['phase']}: {mig['error']}")
        check_same(t.path, dest, os.path.getsize(image))
    dest.unlink()
    return mig


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
                runs[mode].append(idle_migration(image, dest, mode, work))
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
