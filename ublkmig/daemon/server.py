"""The Daemon, the event-loop half of ``serve``: the device's lifecycle, the control socket
and a handler per command (the migration commands drive a migration task), signals, and the
keeper of an NBD image's connections.  Blocking data-plane calls run in worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc
import anyio.streams.buffered  # noqa: F401  (preloaded, below)

import ublkmig.migration.machine  # noqa: F401  (preloaded, below)
from ublkmig import __version__, control, migration, native, state
from ublkmig.daemon.checks import Image
from ublkmig.daemon.options import ServeOptions, _int_arg, parse_migrate_args, resume_options
from ublkmig.errors import UblkmigError, UserError
from ublkmig.log import get_logger

# Preloaded: the control socket's reader and the migration's files are imported when the
# daemon starts, not by the first request that needs them (the migration package imports its
# files on first use, for the CLI's start-up).  Under emulation the first `migrate` took 1.5 s
# instead of 0.2 s that way, with the guest's load waiting on the CPU meanwhile.

READY_TIMEOUT = 60.0  # /dev/ublkbN must answer within this (kernel VMs are slow)
KEEPER_POLL = 0.2  # s: how often the connections of an NBD export serving a device are checked


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
        self._tg: anyio.abc.TaskGroup | None = None
        self._socket: Path | None = None
        # the last migration (running or ended), its destination while it runs, and the
        # event set once its task has released (or taken over) the destination
        self.migration: migration.Migration | None = None
        self._mig_dest: migration.Destination | None = None
        self._mig_settled: anyio.Event | None = None
        self._mig_starting = False
        # set once a migration's start (its destination's dial and handshake, bounded by the
        # destination timeout) is over, whichever way; a cancel meanwhile waits for it
        self._mig_started = anyio.Event()
        self._mig_started.set()
        self.migration_policy = migration.Policy()
        self.reconnects = 0  # times the NBD export serving the device got its connections back
        self._keeper: anyio.CancelScope | None = None
        self._keeper_done = anyio.Event()

    # --- control commands: one handler each -------------------------------------------------
    async def cmd_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.info()

    async def cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_stop("request")
        return {"state": str(State.STOPPING), "pid": os.getpid()}

    # --- migration commands -----------------------------------------------------------------
    def _node(self) -> str:
        """The device's name in messages: /dev/ublkbN."""
        return f"/dev/ublkb{self.device.id}" if self.device else "the device"

    def _running_migration(self) -> migration.Migration:
        mig = self.migration
        if mig is None or mig.ended:
            raise control.ControlError(f"no migration is running on {self._node()}")
        return mig

    async def cmd_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        dev = self.device
        if dev is None or self.state != State.RUNNING:
            raise control.ControlError(f"{self._node()} is not running (it is {self.state})")
        if self._mig_starting or (self.migration is not None and not self.migration.ended):
            cur = self.migration
            what = f" ({cur.opts.mode} to {cur.opts.dest}, {cur.phase})" if cur else ""
            raise control.ControlError(f"a migration is already running on {self._node()}{what}")
        if self.migration is not None and self.migration.phase is migration.Phase.COMPLETED:
            raise control.ControlError(
                f"{self._node()} was migrated already (it now serves {self.image.path}); "
                "serve that image again to migrate it further"
            )
        if self._serves_nbd():
            raise control.ControlError(
                f"{self._node()} serves the NBD export {self.image.path}: migrating it to other "
                "storage is not supported yet"
            )
        if args.get("resume"):
            opts = self._resume_options(args)
        else:
            opts = parse_migrate_args(args, direct=self.opts.direct)
        self._mig_starting = True
        self._mig_started = anyio.Event()
        try:
            dest = await anyio.to_thread.run_sync(self._open_destination, opts.dest, dev)
            # the data plane opens the destination checked and locked here, through its fd
            opts = dataclasses.replace(opts, dest_zeroed=dest.created, dest_fd=max(dest.fd, 0))
            mig = migration.Migration(
                dev.target(), opts, device=self._node(), source=str(self.image.path),
                size=dev.size, io_stats=dev.stats, policy=self.migration_policy,
                on_state=self._save_migration_state,
            )  # fmt: skip
            try:
                await mig.start()
            except BaseException:
                dest.close(remove_created=True)
                raise
        finally:
            self._mig_starting = False
            self._mig_started.set()
        self.migration = mig
        self._mig_dest = dest
        self._mig_settled = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._run_migration, mig, dest, self._mig_settled)
        return {"migration": mig.status()}

    def _resume_options(self, args: dict[str, Any]) -> migration.MigrationOptions:
        """The options of the migration the last daemon of this device left unfinished."""
        assert self.device is not None
        try:
            saved = migration.read_record(self.device.id)
        except state.Damaged as e:
            raise control.ControlError(str(e)) from None
        return resume_options(saved, args, image=self.image.path, node=self._node())

    def _save_migration_state(self, rec: migration.MigrationRecord) -> None:
        """Migration.on_state: the state --resume needs; the image the device's next daemon
        must serve (the destination, once a cutover is in sync)."""
        assert self.device is not None
        state.write(state.migration_path(self.device.id), rec.to_dict())
        image = rec.dest if rec.switched else str(self.image.path)
        self._save_device_state(image)
        if rec.switched:  # the source is not the disk any more: `serve SOURCE` must refuse it
            state.mark_superseded(str(self.image.path), rec.dest, self._node())
            if not migration.is_nbd_uri(rec.dest):
                state.unmark(rec.dest)  # (a migration back to an image it left)
        else:
            state.unmark(str(self.image.path))

    def _save_device_state(self, image: str | None = None) -> None:
        assert self.device is not None
        state.write(state.device_path(self.device.id), {
            "image": image or str(self.image.path), "pid": os.getpid(),
        })  # fmt: skip

    def _try_save_device_state(self) -> None:
        try:
            self._save_device_state()
        except OSError as e:  # serving goes on; only a takeover after a crash would miss it
            self.log.warning("device.state_not_saved", id=self._dev_id(), error=str(e))

    def _open_destination(self, dest: Path | str, dev: native.Device) -> migration.Destination:
        if isinstance(dest, str):  # an NBD export: the data plane connects and checks it
            return migration.Destination(dest, -1, 0, False)

        def who_holds(path: Path) -> str | None:
            infos = control.list_daemons(timeout=2.0, exclude=self._socket)
            return migration.describe_holder(infos, path)

        # another ublkmig device serving this image (or storage under it) is the source too
        with contextlib.suppress(OSError):
            node = os.stat(dest)
            if stat.S_ISBLK(node.st_mode):
                for info in control.list_daemons(timeout=2.0, exclude=self._socket):
                    with contextlib.suppress(OSError, KeyError, TypeError):
                        if (os.stat(info["path"]).st_rdev == node.st_rdev
                                and migration.storage_overlap(os.stat(info["image"]),
                                                              os.stat(self.image.path))):
                            raise UserError(
                                f"the destination {dest} is a ublkmig device serving "
                                f"{info['image']}, which is the source's storage"
                            )  # fmt: skip

        return migration.open_destination(
            dest, source=self.image.path, size=dev.size, device_node=dev.block_path,
            who_holds=who_holds,
        )  # fmt: skip

    async def _run_migration(
        self, mig: migration.Migration, dest: migration.Destination, settled: anyio.Event
    ) -> None:
        try:
            phase = await mig.run()
        except Exception:  # a bug, logged by run() after it let go: the device serves on
            phase = mig.phase
        finally:
            with anyio.CancelScope(shield=True):
                self._settle_migration(mig, dest)
                settled.set()
        if phase is migration.Phase.COMPLETED:
            self.log.info(
                "device.image_changed", id=self._dev_id(), image=str(self.image.path),
                previous=mig.source,
            )  # fmt: skip

    def _settle_migration(self, mig: migration.Migration, dest: migration.Destination) -> None:
        self._mig_dest = None
        assert self.device is not None
        with contextlib.suppress(OSError):
            state.remove(state.migration_path(self.device.id))
        if mig.phase is migration.Phase.COMPLETED:
            # the device serves the destination now: its lock replaces the image's
            old = self.image
            self.image = Image(dest.path, dest.fd, dest.size)
            old.close()
            self._try_save_device_state()
            return
        self._try_save_device_state()
        removed = dest.created
        dest.close(remove_created=True)
        if removed:
            self.log.info("migration.destination_removed", dest=str(dest.path))

    def _interrupted(self) -> dict[str, Any] | None:
        """The migration the last daemon of this device left unfinished, if any."""
        if self.device is None or self.migration is not None:
            return None
        try:
            saved = migration.read_record(self.device.id)
        except state.Damaged as e:
            return {"damaged": str(e)}
        return saved.to_dict() if saved is not None and not saved.switched else None

    def _note_interrupted(self) -> None:
        saved = self._interrupted()
        if saved is not None:
            self.log.warning(
                "migration.interrupted", id=self._dev_id(), dest=saved.get("dest"),
                mode=saved.get("mode"), phase=saved.get("phase"),
                hint=f"ublkmig migrate {self._node()} --resume",
            )  # fmt: skip

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        dev = self.device
        assert dev is not None
        return {
            "id": dev.id,
            "path": self._node(),
            "image": str(self.image.path),
            "size": dev.size,
            "data_path": dev.path_name,
            "state": str(self.state),
            "stats": dev.stats(),
            "migration": self.migration.status() if self.migration is not None else None,
            "interrupted": self._interrupted(),
            "reconnects": self.reconnects,
        }

    async def cmd_cutover(self, args: dict[str, Any]) -> dict[str, Any]:
        mig = self._running_migration()
        mig.request_cutover()
        return {"migration": mig.status()}

    async def cmd_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        await self._mig_started.wait()  # a migration still starting is cancelled once started
        mig = self._running_migration()
        mig.cancel("request")
        return {"migration": mig.status()}

    async def cmd_speed(self, args: dict[str, Any]) -> dict[str, Any]:
        mig = self._running_migration()
        mig.set_speed(_int_arg(args, "speed", optional=True))
        return {"migration": mig.status()}

    async def _cancel_migration(self) -> None:
        """Before the device stops: cancel a running migration and wait until it let go of the
        destination (a migration past its cutover completes instead)."""
        # one still starting uses the device: wait for its start (bounded by its destination's
        # timeout), then cancel it like any other
        await self._mig_started.wait()
        mig = self.migration
        if mig is None or self._mig_settled is None:
            return
        if not mig.ended:
            with contextlib.suppress(UblkmigError):
                mig.cancel(self.stop_reason or "stop")
        await self._mig_settled.wait()

    def info(self) -> dict[str, Any]:
        dev = self.device
        assert dev is not None
        mig = self.migration
        return {
            "id": dev.id,
            "path": dev.block_path,
            "image": str(self.image.path),
            "size": dev.size,
            "queues": dev.config.queues,
            "depth": dev.config.depth,
            "lbs": dev.config.logical_block_size,
            "read_only": dev.config.read_only,
            "direct": dev.config.direct,
            "data_path": dev.path_name,
            "flags": dev.flags,
            "state": str(self.state),
            "pid": os.getpid(),
            "stats": dev.stats(),
            "version": __version__,
            "protocol": control.PROTOCOL_VERSION,
            "migration": (
                {"mode": str(mig.opts.mode), "phase": str(mig.phase), "dest": str(mig.opts.dest)}
                if mig is not None
                else None
            ),
            # the destination this daemon holds locked for a running migration
            "migration_dest": str(self._mig_dest.path) if self._mig_dest is not None else None,
        }

    # --- the NBD export serving the device ----------------------------------------------------
    def _serves_nbd(self) -> bool:
        return isinstance(self.image.path, str)

    def _migration_idle(self) -> bool:
        """No migration owns the destination's connections (a running one reconnects its
        destination itself; one past its cutover lets go of them when it ends)."""
        settled = self._mig_settled
        return not self._mig_starting and (settled is None or settled.is_set())

    async def _keep_connected(
        self, dev: native.Device, *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """While an NBD export serves the device (the image, or a migration's destination
        after its cutover): dial its lost connections again, the pause between tries growing
        as the migration's does.  Guest requests wait for them meanwhile, each up to
        --reconnect-wait (the data plane ends those that waited longer)."""
        p = self.migration_policy
        with anyio.CancelScope() as scope:
            self._keeper = scope
            task_status.started()
            try:
                lost_since: float | None = None
                delay = p.reconnect_delay
                attempt = 0
                while True:
                    await anyio.sleep(delay if lost_since is not None else KEEPER_POLL)
                    if not (self._serves_nbd() and self._migration_idle()):
                        lost_since = None
                        continue
                    s = dev.stats()
                    if not s["conn_down"]:
                        lost_since = None
                        continue
                    if lost_since is None:
                        lost_since = time.monotonic()
                        delay, attempt = p.reconnect_delay, 0
                        self.log.warning("device.connection_lost", id=dev.id,
                                         image=str(self.image.path), lost=s["conn_down"],
                                         waiting=s["conn_waiting"])  # fmt: skip
                    attempt += 1
                    try:
                        await anyio.to_thread.run_sync(dev.reconnect)
                    except native.NativeError as e:
                        self.log.info("device.reconnect_failed", id=dev.id, attempt=attempt,
                                      error=e.detail or str(e), retry_in=delay)  # fmt: skip
                        delay = min(delay * 2, p.reconnect_max_delay)
                        continue
                    self.reconnects += 1
                    self.log.info("device.reconnected", id=dev.id, attempt=attempt,
                                  after=round(time.monotonic() - lost_since, 3))  # fmt: skip
                    lost_since = None
            finally:
                self._keeper_done.set()

    async def _stop_keeper(self) -> None:
        """Before the device stops: no reconnect runs while it goes (one under way ends within
        the NBD timeout)."""
        if self._keeper is not None:
            self._keeper.cancel()
            await self._keeper_done.wait()

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
            source_fd=max(self.image.fd, 0),  # the file checked and locked, whatever the path is
            timeout=o.timeout,
            wait=o.reconnect_wait,
            queues=o.queues,
            depth=o.depth,
            logical_block_size=o.logical_block_size,
            read_only=o.read_only,
            direct=o.direct,
            data_path=o.data_path,
            dev_id=-1 if o.recover is None else o.recover,
            recover=o.recover is not None,
        )
        try:
            dev = await anyio.to_thread.run_sync(native.Device.create, config)
        except native.NativeError as e:
            what = "add the ublk device" if o.recover is None else f"recover /dev/ublkb{o.recover}"
            raise UserError(f"cannot {what}: {e}") from e
        self.device = dev
        if o.recover is None:  # a dead daemon's device of this number is gone: so is its state
            state.forget(dev.id)
        c = dev.config  # (a recovered device keeps its own geometry)
        self.log.info(
            "device.added" if o.recover is None else "device.recovering", id=dev.id,
            dev=dev.block_path, image=str(self.image.path), size=dev.size, queues=c.queues,
            depth=c.depth, lbs=c.logical_block_size, read_only=c.read_only, direct=c.direct,
            path=dev.path_name, flags=hex(dev.flags),
        )  # fmt: skip
        started = False
        self._tg = tg
        try:
            server = control.ControlServer(control.socket_path(dev.id))
            self._socket = server.path
            server.register("info", self.cmd_info)
            server.register("stop", self.cmd_stop)
            server.register("status", self.cmd_status)
            server.register("migrate", self.cmd_migrate)
            server.register("cutover", self.cmd_cutover)
            server.register("cancel", self.cmd_cancel)
            server.register("speed", self.cmd_speed)
            await tg.start(server.serve)
            self.log.info("control.listening", id=dev.id, socket=str(server.path))
            if self._stop.is_set():
                return
            try:
                await anyio.to_thread.run_sync(dev.start)
            except native.NativeError as e:
                raise UserError(f"cannot start {dev.block_path}: {e}") from e
            started = True
            self.log.info(
                "device.started" if o.recover is None else "device.recovered", id=dev.id,
                dev=dev.block_path,
            )  # fmt: skip
            if o.recover is not None:
                self._note_interrupted()
            if not await self._wait_ready(dev):
                return
            self.state = State.RUNNING
            await tg.start(self._keep_connected, dev)
            self._try_save_device_state()
            self._announce(dev.block_path)
            self.log.info("device.ready", id=dev.id, dev=dev.block_path)
            await self._stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown(dev, started)

    async def _shutdown(self, dev: native.Device, started: bool) -> None:
        self.state = State.STOPPING
        await self._cancel_migration()
        await self._stop_keeper()
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
        if started and not self.stop_failed:  # gone: nothing to take over any more
            state.forget(dev.id)

    async def _wait_ready(self, dev: native.Device) -> bool:
        """Poll until the block device opens and answers a read (there may be no udev)."""
        assert self._stop is not None
        deadline = anyio.current_time() + READY_TIMEOUT
        why = "it does not exist"
        while not self._stop.is_set():
            try:
                await anyio.to_thread.run_sync(
                    _probe, dev.block_path, dev.config.logical_block_size, abandon_on_cancel=True
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
