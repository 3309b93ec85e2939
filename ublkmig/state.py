"""What a daemon leaves behind for the one that takes its device over (``serve --recover``).

Two small JSON files per device in the run directory (``/run/ublkmig``, beside the control
sockets; tmpfs, so they live exactly as long as a ublk device can):

- ``ublkb<N>.json``, the device: the image it serves.  Written once the device is ready, and
  again when a migration cuts over (before the switch: from then on the destination holds
  everything).  ``--recover`` refuses another image.
- ``ublkb<N>.migration.json``, a running migration: its destination and options, its phase,
  and ``reach``, the chunks below which the destination may hold copies.  Written at every
  phase change and every few seconds; removed when the migration ends.  ``migrate --resume``
  continues from it.

A clean stop removes both.  Each write replaces the file atomically (rename).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ublkmig import control

VERSION = 1


def device_path(dev_id: int) -> Path:
    return control.run_dir() / f"ublkb{dev_id}.json"


def migration_path(dev_id: int) -> Path:
    return control.run_dir() / f"ublkb{dev_id}.migration.json"


def write(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` (a crash leaves the old file or the new one)."""
    control.ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, **data}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    """The file's content; None if there is none (or it is not one of ours)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    return data


def remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def forget(dev_id: int) -> None:
    """Both files of /dev/ublkb<N>: the device is gone (or new), nothing to take over."""
    with contextlib.suppress(OSError):
        remove(device_path(dev_id), migration_path(dev_id))
