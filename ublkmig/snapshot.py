"""Snapshot mode's files on disk, after a daemon died: fold the deltas back into the image.

A snapshot migration keeps the source frozen and the guest's writes in deltas,
``PREFIX.1``, ``PREFIX.2``, ... (``PREFIX`` is ``IMAGE.ublkmig-delta``, or
``DELTA_DIR/NAME.ublkmig-delta``), and records in the layer map
``PREFIX.map`` which delta holds each chunk's newest data (native/migrate/layermap.c):
a record is in the file (the page cache) before the write that caused it is
issued, so a daemon that dies (SIGKILL) leaves every acknowledged write
findable; after a reboot (a power cut) records are trusted only up to the
header's ``committed`` count, which the data plane raises, once the deltas and
the records are durable, before it acknowledges a FLUSH or FUA write.

``fold_back`` copies each chunk the map names from its delta into the image,
makes the image durable, then removes the map and the deltas (the map first:
deltas without a map are garbage; a map without its deltas fails closed).
Folding again after a crash mid-way is harmless: the map still names the same
data.  The image then holds every acknowledged write, and ``migrate --resume``
goes on as in the other modes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ublkmig.errors import UserError

SUFFIX = ".ublkmig-delta"
MAGIC = b"UBMLAYER"
RECORD = 0x4C4D4255  # "UBML"
# magic, version, record size, size, chunk size, committed, the boot that wrote it
HEADER = struct.Struct("=8sIIQQQ16s8x")
REC = struct.Struct("=IIQ")  # magic, generation, chunk
MAX_DELTAS = 8  # UBM_MAX_DELTAS


def delta_prefix(source: str | os.PathLike[str], delta_dir: str | os.PathLike[str] | None) -> Path:
    """Where a snapshot migration of ``source`` keeps its deltas and map (PREFIX.N, .map)."""
    src = Path(source)
    return (Path(delta_dir) if delta_dir is not None else src.parent) / f"{src.name}{SUFFIX}"


@dataclass
class LayerMap:
    prefix: Path
    size: int
    chunk_size: int
    newest: dict[int, int]  # chunk -> the generation holding its newest data (not the source)
    records: int  # records used (all, or the committed ones after a reboot)
    committed: int  # records durable after their data (what a power cut keeps)
    same_boot: bool  # written since this boot: the page cache survived, all are trusted

    def delta(self, gen: int) -> Path:
        return Path(f"{self.prefix}.{gen}")


def map_path(prefix: Path) -> Path:
    return Path(f"{prefix}.map")


def boot_id() -> bytes:
    """This boot's id, as the data plane stores it (16 bytes; zeroes if unknown)."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text()
        return bytes.fromhex(text.strip().replace("-", ""))
    except (OSError, ValueError):
        return bytes(16)


def read_map(prefix: Path, same_boot: bool | None = None) -> LayerMap | None:
    """The layer map at PREFIX.map (None if there is none); UserError if it is damaged.
    Every record counts if it was written since this boot (``same_boot``: decided by the
    boot id unless given), only the committed ones otherwise."""
    path = map_path(prefix)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read the snapshot layer map {path}: {e.strerror}") from None
    if len(data) < HEADER.size:
        raise UserError(f"the snapshot layer map {path} is damaged (no header)")
    magic, version, rec_size, size, chunk_size, committed, boot = HEADER.unpack_from(data)
    if magic != MAGIC or version != 1 or rec_size != REC.size or not chunk_size or \
            chunk_size & (chunk_size - 1):  # fmt: skip
        raise UserError(f"the snapshot layer map {path} is damaged (bad header)")
    if same_boot is None:
        same_boot = boot != bytes(16) and boot == boot_id()
    chunks = -(-size // chunk_size)
    have = (len(data) - HEADER.size) // REC.size
    if committed > have:
        raise UserError(f"the snapshot layer map {path} is damaged ({committed} records "
                        f"committed, {have} there)")  # fmt: skip
    newest: dict[int, int] = {}
    n = 0
    # a record torn by a crash can only be the last: what follows a bad one is ignored
    for off in range(HEADER.size, HEADER.size + (have if same_boot else committed) * REC.size,
                     REC.size):  # fmt: skip
        rmagic, gen, chunk = REC.unpack_from(data, off)
        if rmagic != RECORD or not 0 <= gen <= MAX_DELTAS or chunk >= chunks:
            if n < committed:
                raise UserError(f"the snapshot layer map {path} is damaged (record {n})")
            break
        if gen:
            newest[chunk] = gen
        else:  # folded back into the source (and maybe punched out of the deltas since)
            newest.pop(chunk, None)
        n += 1
    return LayerMap(prefix, size, chunk_size, newest, n, committed, same_boot)


def fold_back(lm: LayerMap, image_fd: int, image_size: int) -> int:
    """Copy each chunk from its newest delta into the image (``image_fd``, open for writing),
    make it durable, then remove the map and the deltas.  Returns the chunks folded.
    UserError (nothing removed) if a delta is missing or the sizes disagree."""
    if lm.size != image_size:
        raise UserError(f"the snapshot layer map {map_path(lm.prefix)} is of a device of "
                        f"{lm.size} bytes, not of this image's {image_size}")  # fmt: skip
    fds: dict[int, int] = {}
    try:
        for gen in sorted(set(lm.newest.values())):
            try:
                fds[gen] = os.open(lm.delta(gen), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise UserError(f"the snapshot delta {lm.delta(gen)}, which holds guest "
                                f"writes, cannot be opened: {e.strerror}") from None  # fmt: skip
        try:
            for chunk, gen in sorted(lm.newest.items()):
                off = chunk * lm.chunk_size
                want = min(lm.chunk_size, lm.size - off)
                data = os.pread(fds[gen], want, off)
                if len(data) != want:
                    raise UserError(f"the snapshot delta {lm.delta(gen)} is short at {off}")
                done = 0
                while done < want:
                    done += os.pwrite(image_fd, data[done:], off + done)
            os.fsync(image_fd)
        except OSError as e:  # nothing removed: folding again later is harmless
            raise UserError(f"folding the snapshot deltas {lm.prefix}.N back into the image "
                            f"failed: {e.strerror}") from None  # fmt: skip
    finally:
        for fd in fds.values():
            os.close(fd)
    remove(lm.prefix)
    return len(lm.newest)


def leftovers(prefix: Path) -> list[Path]:
    """The deltas at PREFIX.N that exist."""
    return [p for g in range(1, MAX_DELTAS + 1) if (p := Path(f"{prefix}.{g}")).exists()]


def remove(prefix: Path) -> None:
    """Remove a snapshot migration's files (the map first), and make that durable."""
    map_path(prefix).unlink(missing_ok=True)
    for gen in range(1, MAX_DELTAS + 1):
        Path(f"{prefix}.{gen}").unlink(missing_ok=True)
    fd = os.open(prefix.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
