"""Live migration: the policy and its state machine, at chunk-pass granularity.

The data plane (native/) routes every guest request and copies chunks; this package decides
which passes to run, when the copy is in sync, when to pause guest I/O, when to cut over, and
when to give up.  Its files, from the bottom up (each imports only files listed before it):

- ``phase.py``: the phases of a migration (Phase), and which have ended (ENDED)
- ``options.py``: its modes and options (Mode, MigrationOptions), their defaults, the checks of
  what a user gives
- ``policy.py``: the knobs (Policy) and the decisions as plain code: in sync, a count that
  stopped shrinking, auto mode's switches between mirroring and tracking writes (Auto)
- ``destination.py``: a file or block device destination, checked, created and locked
  (open_destination, storage_overlap), and who holds a locked one (describe_holder)
- ``status.py``: what ``status`` answers: progress, rate, time to go
- ``record.py``: the record ``migrate --resume`` goes on from, and its saving
- ``steps.py``: the calls into the data plane (a MigrationTarget) that the machine repeats (a
  pass, pause, resume, stats, finish), made from the event loop: blocking ones in a worker
  thread, a pass aborted on cancel, failures as one line
- ``machine.py``: the state machine (Migration), its phases and its run loop

Only steps.py and machine.py import anyio.  The names below are imported from their files on
first use, so that importing one file loads only what it needs: the CLI imports options.py and
phase.py for its commands, and its start-up time matters.
"""

from __future__ import annotations

import importlib
from typing import Any

# the public names, by the file that defines them
_NAMES = {
    "phase": ("ENDED", "SYNCING", "Phase"),
    "options": (
        "DEFAULT_BUSY_DEPTH", "DEFAULT_CHUNK_SIZE", "DEFAULT_DEST_TIMEOUT",
        "DEFAULT_FALLBACK_WAIT_MS", "MAX_DEST_TIMEOUT", "MAX_SPEED", "MIN_DEST_TIMEOUT",
        "MigrationOptions", "Mode", "check_chunk_size", "check_dest_timeout",
        "check_fallback_wait", "check_mode", "check_speed", "is_nbd_uri",
    ),
    "policy": ("Policy",),
    "record": ("MigrationRecord", "read_record"),
    "destination": ("Destination", "describe_holder", "open_destination", "storage_overlap"),
    "steps": ("MigrationTarget", "errno_text"),
    "machine": ("Migration",),
}  # fmt: skip
_WHERE = {name: file for file, names in _NAMES.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    file = _WHERE.get(name)
    if file is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{file}"), name)
    globals()[name] = value
    return value
