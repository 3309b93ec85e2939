"""The destination of a migration to a file or block device: checked (not the source, no
storage shared with it, not the device being migrated, large enough), created if missing, and
locked (an exclusive flock for the migration's life); and who holds one that is locked.

An NBD export is not opened here: the data plane dials it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ublkmig.errors import UserError
from ublkmig.units import format_size


@dataclass
class Destination:
    """DEST, opened read-write with an exclusive flock held for the migration's life (an NBD
    export: its URI, fd -1; the data plane opens it)."""

    path: Path | str
    fd: int
    size: int
    created: bool  # a new sparse file made here (reads as zeroes)

    def close(self, remove_created: bool = False) -> None:
        if self.fd >= 0:
            if remove_created and self.created:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = -1


def _same_storage(a: os.stat_result, b: os.stat_result) -> bool:
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _sysfs_block(st: os.stat_result, sysfs: Path) -> Path | None:
    if not stat.S_ISBLK(st.st_mode):
        return None
    return sysfs / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _loop_backing(st: os.stat_result, sysfs: Path) -> os.stat_result | None:
    """A loop device's backing file, as it is now (None: not a loop device, or detached); for a
    partition of one, its disk's."""
    node = _sysfs_block(st, sysfs)
    if node is not None and (node / "partition").exists():
        node = node.resolve().parent
    backing = _read(node / "loop" / "backing_file") if node is not None else None
    if not backing:
        return None
    try:
        return os.stat(backing.removesuffix(" (deleted)"))
    except OSError:
        return None


def _extent(st: os.stat_result, sysfs: Path) -> tuple[str, int, int] | None:
    """A block device as (its whole disk's MAJ:MIN, first sector, sectors)."""
    node = _sysfs_block(st, sysfs)
    if node is None:
        return None
    size = _read(node / "size")
    if size is None:
        return None
    if (node / "partition").exists():
        whole = _read(node.resolve().parent / "dev")
        start = _read(node / "start")
        if whole is None or start is None:
            return None
        return whole, int(start), int(size)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", 0, int(size)


def storage_overlap(a: os.stat_result, b: os.stat_result, sysfs: Path = Path("/sys")) -> bool:
    """Whether writing one would change the other: the same file or device, a loop device over
    the other (either way round), or block devices sharing sectors of one disk (a partition
    and its whole disk, overlapping partitions)."""
    if _same_storage(a, b):
        return True
    ea, eb = _extent(a, sysfs), _extent(b, sysfs)
    if ea is not None and eb is not None and ea[0] == eb[0]:  # one disk: by its sectors
        return ea[1] < eb[1] + eb[2] and eb[1] < ea[1] + ea[2]
    for x, y in ((a, b), (b, a)):
        backing = _loop_backing(x, sysfs)
        if backing is not None and storage_overlap(backing, y, sysfs):
            return True
    return False


def open_destination(
    dest: Path,
    *,
    source: Path,
    size: int,
    device_node: str | None = None,
    who_holds: Callable[[Path], str | None] | None = None,
) -> Destination:
    """Check DEST for a migration of ``source`` (``size`` bytes) and lock it; create it (sparse,
    at the source's size) if missing.  UserError, one line, for anything wrong.

    ``who_holds(path)`` names what holds a DEST that is locked (a daemon serving it, or
    another migration); it may block (it asks the other daemons).
    """
    if not dest.is_absolute():
        raise UserError(f"the destination must be an absolute path, not {dest}")
    parent = dest.parent
    if not parent.is_dir():
        raise UserError(f"the destination's directory does not exist: {parent}")
    src_st = os.stat(source)
    created = False
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"cannot access the destination {dest}: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"the destination is a directory: {dest}")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UserError(f"the destination is not a regular file or a block device: {dest}")
        if _same_storage(st, src_st):
            raise UserError(f"the destination is the source: {dest}")
        if storage_overlap(st, src_st):
            raise UserError(
                f"the destination {dest} shares storage with the source {source} (a loop device "
                "over it, or overlapping partitions of one disk): writing one would change "
                "the other"
            )
        if device_node is not None:
            try:
                if _same_storage(st, os.stat(device_node)):
                    raise UserError(f"the destination is the device being migrated: {dest}")
            except FileNotFoundError:
                pass
    try:
        if st is None:
            mode = stat.S_IMODE(src_st.st_mode) if stat.S_ISREG(src_st.st_mode) else 0o600
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            created = True
        elif stat.S_ISBLK(st.st_mode):
            # O_EXCL on a block device: refused while it is mounted or claimed elsewhere
            fd = os.open(dest, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        else:
            fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY and st is not None:
            raise UserError(
                f"the destination {dest} is in use (mounted, or held by another program)"
            ) from None
        what = "create" if st is None else "open"
        raise UserError(f"cannot {what} the destination {dest}: {e.strerror}") from None
    d = Destination(dest, fd, 0, created)
    try:
        if st is not None and not _same_storage(os.fstat(fd), st):
            # (the data plane uses this descriptor, not the path, so what was checked is used)
            raise UserError(f"the destination {dest} changed while it was being checked")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = who_holds(dest) if who_holds is not None else None
            raise UserError(
                f"the destination {dest} is in use by "
                + (holder or "another migration or process (it is locked)")
            ) from None
        if created:
            os.ftruncate(fd, size)
        d.size = os.lseek(fd, 0, os.SEEK_END)
        if d.size < size:
            raise UserError(
                f"the destination {dest} ({d.size} bytes, {format_size(d.size)}) is smaller "
                f"than the source ({size} bytes, {format_size(size)})"
            )
    except UserError:
        d.close(remove_created=True)
        raise
    except OSError as e:
        d.close(remove_created=True)
        raise UserError(f"cannot prepare the destination {dest}: {e.strerror}") from None
    return d


def describe_holder(infos: list[dict[str, Any]], dest: Path) -> str | None:
    """Which daemon (of these ``info`` answers) holds ``dest``: as its image, or as the
    destination of its migration."""
    for info in infos:
        for key, what in (("image", "serving it"), ("migration_dest", "migrating to it")):
            other = info.get(key)
            if not isinstance(other, str):
                continue
            try:
                if os.path.samefile(other, dest):
                    return f"{info.get('path')} (pid {info.get('pid')}), {what}"
            except OSError:
                continue
    return None
