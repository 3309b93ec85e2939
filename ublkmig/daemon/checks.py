"""Before the device is added: the image checked as ``serve`` would serve it, opened and
locked (a file, a block device, or an NBD export's URI), which daemon of this host serves
an image, root, the ublk driver (``modprobe ublk_drv`` once if it is missing), and a forced
data path against what the driver offers."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from ublkmig import control, migration, native
from ublkmig.daemon.options import ServeOptions
from ublkmig.errors import UblkmigError, UserError
from ublkmig.log import get_logger
from ublkmig.native import DataPath

CONTROL_DEVICE = Path("/dev/ublk-control")

DRIVER_HINT = (
    "ublk needs Linux 6.0+ built with CONFIG_BLK_DEV_UBLK, e.g. Debian trixie's 6.12 and newer; "
    "Debian bookworm's 6.1 lacks it"
)


class Image:
    """The image, opened as the device will use it, with its exclusive flock held."""

    def __init__(self, path: Path | str, fd: int, size: int) -> None:
        self.path = path  # a str: an NBD export's URI (after a migration to one)
        self.fd = fd
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1


def open_image(opts: ServeOptions) -> Image:
    """Check the image as ``opts`` would serve it and lock it; UserError on anything wrong."""
    if isinstance(opts.image, str):
        return _nbd_image(opts, opts.image)
    path = Path(os.path.abspath(opts.image))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"image not found: {opts.image}") from None
    except OSError as e:
        raise UserError(f"cannot access image {opts.image}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"image is a directory: {opts.image}")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UserError(f"image is not a regular file or a block device: {opts.image}")
    if opts.direct:
        _check_direct(path, opts.image)
    mode = "reading" if opts.read_only else "reading and writing"
    # a block device exclusively: refused while mounted or claimed (a partition of it too)
    excl = os.O_EXCL if stat.S_ISBLK(st.st_mode) else 0
    try:
        fd = os.open(path, (os.O_RDONLY if opts.read_only else os.O_RDWR) | os.O_CLOEXEC | excl)
    except OSError as e:
        hint = "" if opts.read_only else " (--read-only serves it read-only)"
        if e.errno == errno.EBUSY and excl:
            raise UserError(f"image is in use (mounted, or held by another program): "
                            f"{opts.image}") from None  # fmt: skip
        if e.errno == errno.EROFS:
            raise UserError(f"image is on a read-only file system: {opts.image}{hint}") from None
        raise UserError(f"cannot open image {opts.image} for {mode}: {e.strerror}{hint}") from None
    image = Image(path, fd, 0)
    try:
        image.size = os.lseek(fd, 0, os.SEEK_END)  # files and block devices alike
        if image.size == 0:
            raise UserError(f"image is empty: {opts.image}")
        try:
            os.pread(fd, min(image.size, 4096), 0)
        except OSError as e:
            raise UserError(f"cannot read image {opts.image}: {e.strerror}") from None
        lbs = opts.logical_block_size
        if image.size % lbs:
            raise UserError(
                f"image size {image.size} bytes is not a multiple of the logical block size "
                f"{lbs}: {opts.image}"
            )
        _lock(image, opts.image)
    except BaseException:
        image.close()
        raise
    return image


def _nbd_image(opts: ServeOptions, uri: str) -> Image:
    """An NBD export as the image: the data plane dials, checks and sizes it.  No lock can
    keep another client off it; another daemon of this host serving it is refused here."""
    if opts.direct:
        raise UserError(f"--direct applies to a file or a block device, not to the NBD export "
                        f"{uri}")  # fmt: skip
    info = find_server(uri)
    if info is not None:
        raise UserError(f"the NBD export {uri} is already served by {info.get('path')} (pid "
                        f"{info.get('pid')})")  # fmt: skip
    return Image(uri, -1, 0)


def _check_direct(path: Path, shown: Path) -> None:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise UserError(
                f"the file system of {shown} does not support --direct (O_DIRECT)"
            ) from None
        # other errors (permissions...) are reported by the plain open that follows


def _lock(image: Image, shown: Path) -> None:
    try:
        fcntl.flock(image.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = find_server(image.path)
        if info is not None:
            raise UserError(
                f"image {shown} is already served by {info.get('path')} (pid {info.get('pid')})"
            ) from None
        raise UserError(
            f"image {shown} is locked by another process (another ublkmig serve of it starting "
            "or stopping?)"
        ) from None


def find_server(image: Path | str, exclude: Path | None = None) -> dict[str, Any] | None:
    """The ``info`` of the daemon of this host that serves ``image`` (a path, or an NBD
    export's URI), if one answers (but the one listening on ``exclude``)."""
    try:
        daemons = control.list_daemons(timeout=2.0, exclude=exclude)
    except UblkmigError:
        return None
    for info in daemons:
        if same_image(str(info.get("image", "")), image):
            return info
    return None


def same_image(a: str, b: Path | str) -> bool:
    """Whether two images are one: the same file or device, or the same NBD URI."""
    if migration.is_nbd_uri(a) or migration.is_nbd_uri(str(b)):
        return a == str(b)
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):
        return False


def check_root() -> None:
    if os.geteuid() != 0:
        raise UserError("must run as root (ublk devices need CAP_SYS_ADMIN)")


def ensure_driver() -> None:
    """UserError unless /dev/ublk-control exists; tries ``modprobe ublk_drv`` once as root."""
    if CONTROL_DEVICE.exists():
        return
    release = os.uname().release
    modprobe = shutil.which("modprobe", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if modprobe is None or os.geteuid() != 0:
        raise UserError(
            f"no ublk driver: {CONTROL_DEVICE} is missing; load it with `modprobe ublk_drv` "
            f"as root (this is Linux {release}); {DRIVER_HINT}"
        )
    try:
        r = subprocess.run([modprobe, "ublk_drv"], capture_output=True, text=True, timeout=60)
        failure = r.stderr.strip().splitlines()[-1] if r.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = str(e)
    deadline = time.monotonic() + 2.0
    while not failure and not CONTROL_DEVICE.exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # devtmpfs creates the node right after the load
    if CONTROL_DEVICE.exists():
        get_logger().info("driver.loaded", module="ublk_drv")
        return
    why = "found no such module" if "not found" in failure else (failure or "did not create it")
    raise UserError(
        f"no ublk driver: {CONTROL_DEVICE} is missing and `modprobe ublk_drv` {why} "
        f"(this is Linux {release}); {DRIVER_HINT}"
    )


def check_data_path(path: DataPath) -> None:
    """UserError if a forced data path is not offered by the running driver."""
    if path == DataPath.AUTO:
        return
    feats = native.features()
    need, since = native.PATH_NEEDS[path]
    if feats & need != need:
        flags = ", ".join(f"UBLK_F_{n}" for n in native.decode_features(need & ~feats))
        offered = ", ".join(p.label for p in native.paths_offered(feats))
        raise UserError(
            f"data path {path.label} needs {flags} (Linux {since}+), which this kernel's ublk "
            f"driver (Linux {os.uname().release}) does not offer; it offers: {offered}"
        )
