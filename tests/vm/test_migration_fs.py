"""Live migration under a mounted ext4 while a writer creates, rewrites and deletes files
(mounted with ``-o discard``, so deletions send discards through the migration too)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest
from vmlib import (
    MakeImage,
    ServeFactory,
    Steps,
    assert_same_bytes,
    check_completed,
    finish_migrate,
    run_ok,
    sha256_of,
    start_migrate,
)

MiB = 1 << 20
SIZE = 96 * MiB
LIVE_BYTES = 24 * MiB  # the writer deletes old files to stay under this


class FileWriter(threading.Thread):
    """Writes files with known sha256 in a loop: new files, rewrites, deletions, an fsync
    now and then.  ``mark()`` then ``stop(after=N)``: stop once N more files were written."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True, name=f"writer-{root}")
        self.root = root
        self.sums: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.written = 0  # files written
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._until: int | None = None
        self._cond = threading.Condition()

    def run(self) -> None:
        rng = random.Random(4711)
        try:
            for d in range(8):
                (self.root / f"d{d}").mkdir(exist_ok=True)
            i = 0
            while not self._halt.is_set():
                i += 1
                names = sorted(self.sums)
                if names and i % 5 == 0:
                    name = rng.choice(names)  # rewrite an old file
                else:
                    name = f"d{i % 8}/f{i}"
                size = rng.choice([0, 1, 4095, 4096, 65536 + 17, 300_000, MiB + 3, 2 * MiB])
                data = rng.randbytes(size)
                with open(self.root / name, "wb") as f:
                    f.write(data)
                    if i % 7 == 0:
                        os.fsync(f.fileno())
                self.sums[name] = hashlib.sha256(data).hexdigest()
                self.sizes[name] = size
                while sum(self.sizes.values()) > LIVE_BYTES:
                    old = rng.choice(sorted(self.sizes))
                    (self.root / old).unlink()
                    del self.sums[old], self.sizes[old]
                if i % 11 == 0:
                    os.sync()
                with self._cond:
                    self.written += 1
                    if self._until is not None and self.written >= self._until:
                        self._halt.set()
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - re-raised by stop()
            self.error = e
            with self._cond:
                self._cond.notify_all()

    def wait_files(self, n: int, timeout: float = 120.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.written >= n or self.error is not None, timeout)
        self.check()
        assert self.written >= n, f"the writer wrote {self.written} files, not {n}"

    def stop(self, after: int = 0, timeout: float = 120.0) -> None:
        with self._cond:
            self._until = self.written + after
            if after == 0:
                self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not stop"
        self.check()

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(120)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def check_files(self) -> None:
        found = {str(p.relative_to(self.root)) for p in self.root.glob("d*/*")}
        assert found == set(self.sums), (f"files missing: {sorted(set(self.sums) - found)}; "
                                         f"unexpected: {sorted(found - set(self.sums))}")
        bad = [n for n, s in self.sums.items()
               if hashlib.sha256((self.root / n).read_bytes()).hexdigest() != s]
        assert not bad, f"{len(bad)} of {len(self.sums)} files differ: {bad[:10]}"


# mirror and snapshot (a filesystem's metadata through layered deltas); dbt's writes take
# mirror's path to the source, and fio verifies each mode across a migration
@pytest.mark.parametrize("mode", ["mirror", "snapshot"])
def test_ext4_with_files_written_across_migration(mode: str, make_image: MakeImage,
                                                  serve: ServeFactory, scratch: Path) -> None:
    t = Steps(f"ext4-{mode}")
    image = make_image(SIZE)
    dest = scratch / "dest.img"
    mnt = scratch / "mnt"
    mnt.mkdir()
    dev = serve(image, "--queues", "2")
    run_ok("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev.device)
    run_ok("mount", "-t", "ext4", "-o", "discard", dev.device, str(mnt))
    writer = FileWriter(mnt)
    try:
        writer.start()
        writer.wait_files(10)  # files before the migration
        t("mkfs, mount, first files")
        proc = start_migrate(dev.device, dest, "--mode", mode, "--speed", "24M")
        out = finish_migrate(proc)
        t("migration")
        writer.stop(after=10)  # and after the cutover
        t("files after the cutover")
        check_completed(dev.device, dest, mode)
        print(f"ext4/{mode}: {out.strip().splitlines()[-1]}; {writer.written} files written, "
              f"{len(writer.sums)} kept")
        os.sync()
        writer.check_files()
    finally:
        writer.halt()
        run_ok("umount", str(mnt))
    # again from a fresh mount: what is on the disk (DEST), not in the page cache
    run_ok("mount", "-t", "ext4", dev.device, str(mnt))
    try:
        writer.check_files()
    finally:
        run_ok("umount", str(mnt))
    run_ok("fsck.ext4", "-fn", dev.device)
    t("remount, check files, fsck")
    digest = assert_same_bytes(dev.device, dest, SIZE)
    dev.stop()
    assert sha256_of(dest) == digest, "DEST differs from what the device showed"
    t("compare")
