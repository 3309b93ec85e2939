"""``ublkmig serve``: one ublk device for one image, for as long as the daemon runs.

Lifecycle: validate the image and the options (before touching the driver),
check root, check ``/dev/ublk-control`` (``modprobe ublk_drv`` once if it is
missing), hold an exclusive non-blocking flock on the image, then in the event
loop: add the device (ADD_DEV + SET_PARAMS), listen on the control socket,
start it (queue threads + START_DEV), wait until ``/dev/ublkbN`` exists and
answers a read, print its path as the first stdout line, serve the control
socket until SIGINT/SIGTERM/SIGHUP or a ``stop`` request, then stop (in-flight I/O
completes), delete the device and remove the socket.

Every blocking data-plane call runs in a worker thread; the event loop only
waits for it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc

from ublkmig import __version__, control, native
from ublkmig.errors import UblkmigError, UserError
from ublkmig.log import get_logger
from ublkmig.native import DataPath

READY_TIMEOUT = 60.0  # /dev/ublkbN must answer within this (kernel VMs are slow)
CONTROL_DEVICE = Path("/dev/ublk-control")

DRIVER_HINT = (
    "ublk needs Linux 6.0+ built with CONFIG_BLK_DEV_UBLK, e.g. Debian trixie's 6.12 and newer; "
    "Debian bookworm's 6.1 lacks it"
)


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve`` was asked for (ranges: see native.MAX_QUEUES etc., checked by the CLI
    and again by the data plane)."""

    image: Path
    queues: int = native.DeviceConfig.queues
    depth: int = native.DeviceConfig.depth
    read_only: bool = False
    logical_block_size: int = native.DeviceConfig.logical_block_size
    direct: bool = False
    data_path: DataPath = DataPath.AUTO


class Image:
    """The image, opened as the device will use it, with its exclusive flock held."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1


def open_image(opts: ServeOptions) -> Image:
    """Check the image as ``opts`` would serve it and lock it; UserError on anything wrong."""
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
    try:
        fd = os.open(path, (os.O_RDONLY if opts.read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        hint = "" if opts.read_only else " (--read-only serves it read-only)"
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


def find_server(image: Path) -> dict[str, Any] | None:
    """The ``info`` of the daemon of this host that serves ``image``, if one answers."""
    try:
        daemons = control.list_daemons(timeout=2.0)
    except UblkmigError:
        return None
    for info in daemons:
        with contextlib.suppress(OSError, TypeError):
            if os.path.samefile(info.get("image", ""), image):
                return info
    return None


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


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class Daemon:
    """The event-loop half of ``serve``: device, control socket, signals."""

    def __init__(self, opts: ServeOptions, image: Image, out: TextIO) -> None:
        self.opts = opts
        self.image = image
        self.out = out
        self.device: native.Device | None = None
        self.state = State.STARTING
        self.stop_reason = ""
        self.stop_failed = False
        self.log = get_logger()
        self._stop: anyio.Event | None = None

    # --- control commands: one handler each -------------------------------------------------
    async def cmd_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.info()

    async def cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_stop("request")
        return {"state": str(State.STOPPING), "pid": os.getpid()}

    def info(self) -> dict[str, Any]:
        dev = self.device
        assert dev is not None
        return {
            "id": dev.id,
            "path": dev.block_path,
            "image": str(self.image.path),
            "size": dev.size,
            "queues": self.opts.queues,
            "depth": self.opts.depth,
            "lbs": self.opts.logical_block_size,
            "read_only": self.opts.read_only,
            "direct": self.opts.direct,
            "data_path": dev.path_name,
            "flags": dev.flags,
            "state": str(self.state),
            "pid": os.getpid(),
            "stats": dev.stats(),
            "version": __version__,
            "protocol": control.PROTOCOL_VERSION,
        }

    # --- lifecycle --------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        assert self._stop is not None
        if self._stop.is_set():
            self.log.info("device.stop_requested_again", id=self._dev_id(), reason=reason)
            return
        self.stop_reason = reason
        self.log.info("device.stop_requested", id=self._dev_id(), reason=reason)
        self._stop.set()

    def _dev_id(self) -> int | None:
        return self.device.id if self.device else None

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # SIGHUP too: a closed terminal must not leave a device without its server
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                self.request_stop(signal.Signals(signum).name)

    async def run(self) -> int:
        """Serve until stopped; 0 after a clean stop, 1 if STOP_DEV failed (errors raise, after
        cleaning up)."""
        _quiet_benign_races()
        self._stop = anyio.Event()
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            await tg.start(self._watch_signals)
            try:
                await self._serve_device(tg)
            except Exception as e:  # raised after the task group, not wrapped in a group
                error = e
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return 1 if self.stop_failed else 0

    async def _serve_device(self, tg: anyio.abc.TaskGroup) -> None:
        assert self._stop is not None
        o = self.opts
        config = native.DeviceConfig(
            source=self.image.path,
            queues=o.queues,
            depth=o.depth,
            logical_block_size=o.logical_block_size,
            read_only=o.read_only,
            direct=o.direct,
            data_path=o.data_path,
        )
        try:
            dev = await anyio.to_thread.run_sync(native.Device.create, config)
        except native.NativeError as e:
            raise UserError(f"cannot add the ublk device: {e}") from e
        self.device = dev
        self.log.info(
            "device.added", id=dev.id, dev=dev.block_path, image=str(self.image.path),
            size=dev.size, queues=o.queues, depth=o.depth, lbs=o.logical_block_size,
            read_only=o.read_only, direct=o.direct, path=dev.path_name, flags=hex(dev.flags),
        )  # fmt: skip
        started = False
        try:
            server = control.ControlServer(control.socket_path(dev.id))
            server.register("info", self.cmd_info)
            server.register("stop", self.cmd_stop)
            await tg.start(server.serve)
            self.log.info("control.listening", id=dev.id, socket=str(server.path))
            if self._stop.is_set():
                return
            try:
                await anyio.to_thread.run_sync(dev.start)
            except native.NativeError as e:
                raise UserError(f"cannot start {dev.block_path}: {e}") from e
            started = True
            self.log.info("device.started", id=dev.id, dev=dev.block_path)
            if not await self._wait_ready(dev):
                return
            self.state = State.RUNNING
            self._announce(dev.block_path)
            self.log.info("device.ready", id=dev.id, dev=dev.block_path)
            await self._stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown(dev, started)

    async def _shutdown(self, dev: native.Device, started: bool) -> None:
        self.state = State.STOPPING
        self.log.info("device.stopping", id=dev.id, reason=self.stop_reason or "error")
        if started:
            try:
                await anyio.to_thread.run_sync(dev.stop)
            except native.NativeError as e:
                self.stop_failed = True
                self.log.error("device.stop_failed", id=dev.id, error=str(e))
            else:
                self.log.info("device.stopped", id=dev.id, **dev.stats())
        await anyio.to_thread.run_sync(dev.destroy)
        self.log.info("device.deleted", id=dev.id)

    async def _wait_ready(self, dev: native.Device) -> bool:
        """Poll until the block device opens and answers a read (there may be no udev)."""
        assert self._stop is not None
        deadline = anyio.current_time() + READY_TIMEOUT
        why = "it does not exist"
        while not self._stop.is_set():
            try:
                await anyio.to_thread.run_sync(
                    _probe, dev.block_path, self.opts.logical_block_size, abandon_on_cancel=True
                )
                return True
            except OSError as e:
                why = e.strerror or str(e)
            if anyio.current_time() > deadline:
                raise UblkmigError(
                    f"{dev.block_path} did not answer within {READY_TIMEOUT:.0f} s: {why}"
                )
            await anyio.sleep(0.05)
        return False

    def _announce(self, line: str) -> None:
        """The device path, as the first stdout line, flushed."""
        try:
            print(line, file=self.out, flush=True)
        except OSError:  # nobody reads stdout any more: go on serving
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.out.fileno())
                os.close(devnull)


def _quiet_benign_races() -> None:
    """Drop asyncio's "Exception in callback Future.set_result(None) ... InvalidStateError".

    anyio's raw unix sockets (asyncio backend) wake a waiting accept/receive with a reader
    callback ``future.set_result(None)``; when a connection or data arrives in the same loop
    iteration as that wait is cancelled (the daemon closing its listener), the callback finds
    the future cancelled and asyncio prints the error with a traceback to stderr.  Nothing is
    lost, so it goes to the debug log; anything else goes to asyncio's default handler.
    """
    import asyncio

    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.InvalidStateError):
            get_logger().debug("asyncio.race_ignored", message=context.get("message"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _probe(path: str, length: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if len(os.pread(fd, length, 0)) != length:
            raise OSError(errno.EIO, "short read")
    finally:
        os.close(fd)


def serve(opts: ServeOptions, out: TextIO | None = None) -> int:
    """Run the daemon in the foreground; returns its exit status."""
    image = open_image(opts)
    try:
        check_root()
        ensure_driver()
        check_data_path(opts.data_path)
        return anyio.run(Daemon(opts, image, out or sys.stdout).run)
    finally:
        image.close()
