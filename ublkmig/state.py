"""What a daemon leaves behind: for the one that takes its device over (``serve --recover``),
and for every later ``serve`` of an image a completed migration left behind.

Per device, two small JSON files in the run directory (``/run/ublkmig``, beside the control
sockets; tmpfs, so they live exactly as long as a ublk device can):

- ``ublkb<N>.json``, the device: the image it serves.  Written once the device is ready, and
  again when a migration cuts over (inside the cutover's window, before the switch: from
  then on the destination holds everything).  ``--recover`` refuses another image, and refuses
  without this record (unless ``--force``): it cannot know which image is the disk.
- ``ublkb<N>.migration.json``, a running migration: its destination and options, its phase,
  and ``reach``, the chunks below which the destination may hold copies.  Written at every
  phase change and every few seconds; removed when the migration ends.  ``migrate --resume``
  continues from it.

Per superseded image, one file in the state directory (``/var/lib/ublkmig/superseded``,
persistent: it must outlive a reboot, which ends the device and /run with it): written at a
cutover, with the record above, naming the image the migration left (its real path, and the
file or device there) and the one that is the disk now.  ``serve`` refuses a superseded
image (unless ``--force``): serving it again would silently drop every write made since the
cutover.  A later migration *to* that image (it is the disk again once that one cuts over)
removes the mark.

A clean stop removes the device's two files.  Each write replaces its file atomically and
durably (write, fsync, rename, fsync the folder).  A record that exists but cannot be read
fails closed: :class:`Damaged`, never taken for a missing one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ublkmig import control
from ublkmig.errors import UserError

VERSION = 1
ENV_STATE_DIR = "UBLKMIG_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/ublkmig"


class Damaged(UserError):
    """A state file exists but cannot be read: nothing may be concluded from it."""


def state_dir() -> Path:
    return Path(os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR)


def device_path(dev_id: int) -> Path:
    return control.run_dir() / f"ublkb{dev_id}.json"


def migration_path(dev_id: int) -> Path:
    return control.run_dir() / f"ublkb{dev_id}.migration.json"


def write(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data``, durably (a crash leaves the old file or the new one;
    once this returns, the new one survives a power cut)."""
    control.ensure_private_dir(path.parent)
    # a name of its own: two threads of one daemon may save the same file at once (the
    # cutover's record and the sampler's); with one shared name, one could rename the
    # other's half-written file into place, or find it gone
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with open(fd, "w") as f:
            json.dump({"version": VERSION, **data}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _sync_dir(path.parent)


def _sync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> dict[str, Any] | None:
    """The file's content; None if there is none; :class:`Damaged` if it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Damaged(f"{path} is damaged ({e}): remove it once you know which image is the "
                      "disk") from None  # fmt: skip
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise Damaged(f"{path} is not a state file of this ublkmig (version "
                      f"{data.get('version') if isinstance(data, dict) else '?'})")  # fmt: skip
    return data


def remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for d in {p.parent for p in paths}:
        with contextlib.suppress(OSError):
            _sync_dir(d)


def forget(dev_id: int) -> None:
    """Both files of /dev/ublkb<N>: the device is gone (or new), nothing to take over."""
    with contextlib.suppress(OSError):
        remove(device_path(dev_id), migration_path(dev_id))


# --- superseded images --------------------------------------------------------------------
def _superseded_dir() -> Path:
    return state_dir() / "superseded"


def _identity(image: str) -> dict[str, Any]:
    """How an image is recognised again: its real path, and the file (or device) itself."""
    real = os.path.realpath(image)
    ident: dict[str, Any] = {"image": real}
    with contextlib.suppress(OSError):
        st = os.stat(real)
        ident["dev"], ident["ino"], ident["rdev"] = st.st_dev, st.st_ino, st.st_rdev
    return ident


def _mark_path(real: str) -> Path:
    return _superseded_dir() / f"{hashlib.sha256(real.encode()).hexdigest()[:24]}.json"


def mark_superseded(image: str, by: str, device: str) -> None:
    """The migration of ``device`` from ``image`` to ``by`` cuts over: ``image`` is not the
    disk any more (durable before the switch)."""
    ident = _identity(image)
    write(_mark_path(ident["image"]), {**ident, "superseded_by": by, "device": device})


def unmark(image: str) -> None:
    """``image`` is (or stays) the disk: no mark may say otherwise."""
    ident = _identity(image)
    for path, data in _marks():
        if data is not None and _same(data, ident):
            remove(path)


def _marks() -> list[tuple[Path, dict[str, Any] | None]]:
    d = _superseded_dir()
    try:
        paths = sorted(p for p in d.iterdir() if p.suffix == ".json")
    except FileNotFoundError:
        return []
    out: list[tuple[Path, dict[str, Any] | None]] = []
    for p in paths:
        try:
            out.append((p, read(p)))
        except Damaged:
            out.append((p, None))
    return out


def _same(mark: dict[str, Any], ident: dict[str, Any]) -> bool:
    """The same path, and still the same file there (or the same block device): a file made
    later at that path is another image, and a new file that reuses a deleted one's inode
    number (tmpfs does) at another path is too."""
    if mark.get("image") != ident["image"] or "ino" not in ident:
        return False
    if ident.get("rdev"):
        return bool(mark.get("rdev") == ident["rdev"])
    return bool(mark.get("dev") == ident["dev"] and mark.get("ino") == ident["ino"])


def superseded_by(image: str) -> dict[str, Any] | None:
    """The mark saying ``image`` was migrated away from, if any (:class:`Damaged` if a mark
    cannot be read: it might be this image's)."""
    ident = _identity(image)
    for path, data in _marks():
        if data is None:
            raise Damaged(f"{path} is damaged: it may say that {image} is not the disk any "
                          "more; remove it once you know, or serve with --force")  # fmt: skip
        if _same(data, ident):
            return data
    return None
