"""The benchmark's scenarios.  Each runs on a machine with a ublk driver (the kernel VM
when the host has none) and returns plain data for results.json; ``ublkmig bench``
(:mod:`ublkmig.bench.run`) calls them by these names:

- ``datapath`` (``datapath.py``): fio against the backing file, ublkmig serving it, and
  kublk serving it.
- ``idle`` (``idle.py``): each migration mode on an idle disk (full of data, and mostly
  sparse) against ``dd`` of the same image with the same block size.
- ``load`` (``load.py``): each migration mode while fio writes (unthrottled, rate-limited,
  70/30 mix): guest IOPS and latency before, during and after; the cutover stall or final
  pause.
- ``qemu`` (``load.py``, ``load(..., peer=True)``): the same load while QEMU's
  blockdev-mirror moves the disk (the peer), through qemu-storage-daemon's NBD export and
  the kernel's NBD client.
- ``slow`` (``slow.py``): the load at 2000 IOPS to slow destinations (nbdkit's delay
  filter, dm-delay), mirror mode against auto.
- ``yield`` (``yielding.py``, ``yielding``): the copier yielding to guest I/O against
  ``--no-yield``.

What they share: ``common.py`` (settings, images and their check, the migration request,
following a migration's phases, watching the device as often outside one, summaries) and
``under_load.py`` (fio's load with its latency log and verifying writer, one migration under
load, its windows and series, the repetitions combined).

Every migration run ends with the destination compared with the device byte for byte;
a difference raises :class:`IntegrityError`.

The package exports each scenario's function under its module's name, so
``scenarios.load`` is the function; reach a scenario's module with
``importlib.import_module("ublkmig.bench.scenarios.load")``.
"""

from ublkmig.bench.scenarios.common import (
    CHUNK,
    CHUNK_BYTES,
    MODES,
    IntegrityError,
    MiB,
    PhaseLog,
    Settings,
    check_same,
    follow,
    make_image,
    migrate_request,
    run_ok,
    say,
    start_migration,
    summary,
    watch,
)
from ublkmig.bench.scenarios.datapath import datapath, datapath_jobs
from ublkmig.bench.scenarios.idle import dd_seconds, idle
from ublkmig.bench.scenarios.load import PEER_DIFFERENCES, load
from ublkmig.bench.scenarios.slow import SLOW_DESTS, SLOW_MODES, SLOW_WRITE_MS, slow
from ublkmig.bench.scenarios.under_load import (
    Sample,
    combine,
    cpu_per_io,
    load_jobs,
    load_result,
    load_run,
    loaded,
    series,
    windows,
)
from ublkmig.bench.scenarios.yielding import yielding

__all__ = [
    "CHUNK", "CHUNK_BYTES", "MODES", "MiB", "IntegrityError", "PhaseLog", "Settings",
    "check_same", "follow", "make_image", "migrate_request", "run_ok", "say",
    "start_migration", "summary", "watch",
    "Sample", "combine", "cpu_per_io", "load_jobs", "load_result", "load_run", "loaded",
    "series", "windows",
    "datapath", "datapath_jobs", "dd_seconds", "idle", "PEER_DIFFERENCES", "load",
    "SLOW_DESTS", "SLOW_MODES", "SLOW_WRITE_MS", "slow", "yielding",
]  # fmt: skip
