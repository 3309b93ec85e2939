"""The copier yielding to guest I/O (the ``yield`` scenario): the unthrottled load while
the disk moves to a file on the same tmpfs, in mirror and dbt mode, with the copier
yielding (the default: while the guest has requests in flight, a chunk at a time and a
rest between chunks, the pacer's) and without (``--no-yield``).  The windows are those of
:mod:`.under_load`, with the time the copier held back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ublkmig.bench.scenarios.common import MiB, Settings, make_image, say
from ublkmig.bench.scenarios.under_load import combine, load_jobs, load_run


def yielding(s: Settings, work: Path) -> dict[str, Any]:
    """The unthrottled load while the disk moves to a file on the same tmpfs, in mirror and
    dbt mode, with the copier yielding to guest I/O (the default: while the guest has
    requests in flight, a chunk at a time and the pacer's rests) and without
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
                reps.append(load_run(s, job, mode, image, dest, work, yields=yields))
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
