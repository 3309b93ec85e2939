"""The destination must not be the source under another name: real loop devices over the
source image, and real partitions (a partitioned image on a loop device with -P) of one disk,
against ublkmig.migration.storage_overlap and open_destination's one-line refusals."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import sparse_image

from ublkmig.errors import UserError
from ublkmig.migration import open_destination, storage_overlap

MiB = 1 << 20


def _losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


@pytest.fixture
def loops() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        _losetup("-f")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no loop devices here: {e}")
    yield made
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


def attach(loops: list[str], image: Path, *opts: str) -> str:
    dev = _losetup("-f", "--show", *opts, str(image))
    loops.append(dev)
    return dev


def test_a_loop_device_over_the_source_is_the_source(tmp_path: Path, loops: list[str]) -> None:
    src, other = tmp_path / "src.img", tmp_path / "other.img"
    for p in (src, other):
        sparse_image(p, 8 * MiB)
    loop = attach(loops, src)
    assert storage_overlap(os.stat(loop), os.stat(src))
    assert storage_overlap(os.stat(src), os.stat(loop))  # either way round
    assert not storage_overlap(os.stat(attach(loops, other)), os.stat(src))
    with pytest.raises(UserError) as e:
        open_destination(Path(loop), source=src, size=8 * MiB)
    assert str(e.value) == (
        f"the destination {loop} shares storage with the source {src} (a loop device over it, "
        "or overlapping partitions of one disk): writing one would change the other"
    )
    # and a loop device over the source, as the source, against the file as destination
    with pytest.raises(UserError, match="shares storage"):
        open_destination(src, source=Path(loop), size=8 * MiB)


def part_node(whole: str, n: int, tmp: Path) -> str:
    """The node of partition n of loop device ``whole`` (made here from sysfs: this /dev may
    have nobody to make it)."""
    name = Path(whole).name
    sys_dev = Path(f"/sys/block/{name}/{name}p{n}/dev")
    for _ in range(100):
        if sys_dev.exists():
            break
        time.sleep(0.05)
    major, minor = (int(x) for x in sys_dev.read_text().split(":"))
    node = tmp / f"{name}p{n}"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
    return str(node)


def test_partitions_of_one_disk(tmp_path: Path, loops: list[str]) -> None:
    if not shutil.which("sfdisk"):
        pytest.skip("no sfdisk")
    disk = tmp_path / "disk.img"
    sparse_image(disk, 32 * MiB)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\n,8M\n,8M\n", text=True,
                   check=True, capture_output=True)  # fmt: skip
    whole = attach(loops, disk, "-P")
    # (some kernels scan the table only when asked again; an error: they had it already)
    subprocess.run(["partx", "-a", whole], check=False, capture_output=True)
    p1, p2 = part_node(whole, 1, tmp_path), part_node(whole, 2, tmp_path)
    st = {name: os.stat(name) for name in (whole, p1, p2)}
    assert storage_overlap(st[whole], st[p1]) and storage_overlap(st[p2], st[whole])
    assert not storage_overlap(st[p1], st[p2])
    with pytest.raises(UserError, match="shares storage"):
        open_destination(Path(p1), source=Path(whole), size=MiB)
    # the loop device's backing file, too, is the whole disk: a partition overlaps it
    assert storage_overlap(st[p2], os.stat(disk))
