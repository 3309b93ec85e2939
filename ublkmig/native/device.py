"""A ublk device served by the data plane (struct ubm_dev), its configuration and counters."""

from __future__ import annotations

import ctypes
import dataclasses
import errno as errno_mod
import os
import threading
from dataclasses import dataclass

from ublkmig.native.datapath import DataPath, path_name
from ublkmig.native.library import _P, NativeError, Prototypes, _check, _lib
from ublkmig.native.migration import Target

# struct ubm_config's limits
MAX_QUEUES = 64
MAX_DEPTH = 4096
LOGICAL_BLOCK_SIZES = (512, 4096)
DEFAULT_MAX_IO_BYTES = 512 * 1024
DEFAULT_NBD_TIMEOUT = 30.0  # s: the longest wait for an NBD server (the data plane's default)
DEFAULT_RECONNECT_WAIT = 60.0  # s: a request waits for a lost connection (ubm_config.wait_ms)

STAT_FIELDS = (
    "reads",
    "writes",
    "flushes",
    "discards",
    "write_zeroes",
    "read_bytes",
    "write_bytes",
    "errors",
    "inflight",
    "fua_writes",
    "parked",
    "conn_down",
    "conn_waiting",
    "conn_waits",
    "conn_failed",
)  # fmt: skip, struct ubm_stats in order (tests/host/test_native_tables.py checks ubm.h)


class _Config(ctypes.Structure):
    _fields_ = [
        ("source_path", ctypes.c_char_p),
        ("nr_queues", ctypes.c_uint32),
        ("queue_depth", ctypes.c_uint32),
        ("logical_bs", ctypes.c_uint32),
        ("max_io_bytes", ctypes.c_uint32),
        ("read_only", ctypes.c_uint32),
        ("direct", ctypes.c_uint32),
        ("data_path", ctypes.c_uint32),
        ("dev_id", ctypes.c_int32),
        ("recover", ctypes.c_uint32),
        ("source_fd", ctypes.c_int32),
        ("timeout_ms", ctypes.c_uint32),
        ("wait_ms", ctypes.c_uint32),
    ]


class _Stats(ctypes.Structure):
    # The data plane only writes this struct: a spare tail keeps a data plane built with more
    # counters than this binding knows from writing past the buffer.
    _fields_ = [(name, ctypes.c_uint64) for name in STAT_FIELDS] + [
        ("_spare", ctypes.c_uint64 * 16)
    ]


def _stats_dict(s: _Stats) -> dict[str, int]:
    return {name: int(getattr(s, name)) for name in STAT_FIELDS}


PROTOS: Prototypes = {
    "ubm_dev_create": (ctypes.c_int, [ctypes.POINTER(_Config), ctypes.POINTER(_P)]),
    "ubm_dev_start": (ctypes.c_int, [_P]),
    "ubm_dev_stop": (ctypes.c_int, [_P]),
    "ubm_dev_destroy": (None, [_P]),
    "ubm_dev_id": (ctypes.c_int, [_P]),
    "ubm_dev_size": (ctypes.c_uint64, [_P]),
    "ubm_dev_path": (ctypes.c_int, [_P]),
    "ubm_dev_flags": (ctypes.c_uint64, [_P]),
    "ubm_dev_stats": (None, [_P, ctypes.POINTER(_Stats)]),
    "ubm_dev_config": (None, [_P, ctypes.POINTER(_Config)]),
    "ubm_dev_remove_orphan": (ctypes.c_int, [ctypes.c_uint32]),
    "ubm_dev_target": (_P, [_P]),
    "ubm_reconnect": (ctypes.c_int, [_P]),  # of a target: a device's or a simulator's
}


@dataclass(frozen=True)
class DeviceConfig:
    """struct ubm_config."""

    source: str | os.PathLike[str]
    queues: int = 1
    depth: int = 128
    logical_block_size: int = 512
    max_io_bytes: int = DEFAULT_MAX_IO_BYTES
    read_only: bool = False
    direct: bool = False
    data_path: DataPath = DataPath.AUTO
    dev_id: int = -1  # let the kernel choose
    recover: bool = False  # take over device dev_id, whose server died (its geometry wins)
    source_fd: int = 0  # > 0: the checked, locked descriptor the data plane opens again
    timeout: float = DEFAULT_NBD_TIMEOUT  # an NBD source: the longest wait for the server, s
    wait: float = DEFAULT_RECONNECT_WAIT  # a request waits this long for a lost connection, s

    def _to_c(self) -> _Config:
        return _Config(
            source_path=os.fsencode(self.source),
            nr_queues=self.queues,
            queue_depth=self.depth,
            logical_bs=self.logical_block_size,
            max_io_bytes=self.max_io_bytes,
            read_only=int(self.read_only),
            direct=int(self.direct),
            data_path=int(self.data_path),
            dev_id=self.dev_id,
            recover=int(self.recover),
            source_fd=self.source_fd,
            timeout_ms=round(self.timeout * 1000),
            wait_ms=round(self.wait * 1000),
        )


class Device:
    """One ublk device served by the data plane (struct ubm_dev).

    ``create`` adds it (ADD_DEV + SET_PARAMS), ``start`` runs the queue threads
    and START_DEV, ``stop`` (blocking) STOP_DEV and waits for the threads,
    ``destroy`` DEL_DEV and frees.  stats() may be called from any thread while
    the device lives; after destroy() it returns the last counters read.
    """

    def __init__(self, handle: int, config: DeviceConfig, c_config: _Config) -> None:
        self._handle: int | None = handle
        self._c_config = c_config  # keeps source_path's bytes alive as long as the device
        self._lock = threading.Lock()
        self._last_stats = dict.fromkeys(STAT_FIELDS, 0)
        lib = _lib()
        eff = _Config()
        lib.ubm_dev_config(handle, ctypes.byref(eff))
        # what is in effect: the queues granted; a recovered device's own geometry
        self.config = dataclasses.replace(
            config, queues=eff.nr_queues, depth=eff.queue_depth,
            logical_block_size=eff.logical_bs, max_io_bytes=eff.max_io_bytes,
            read_only=bool(eff.read_only), data_path=DataPath(eff.data_path), dev_id=eff.dev_id,
        )  # fmt: skip
        self.id: int = lib.ubm_dev_id(handle)
        self.size: int = int(lib.ubm_dev_size(handle))
        self.data_path = DataPath(lib.ubm_dev_path(handle))
        self.flags: int = int(lib.ubm_dev_flags(handle))

    @classmethod
    def create(cls, config: DeviceConfig) -> Device:
        c_config = config._to_c()
        handle = _P()
        _check(_lib().ubm_dev_create(ctypes.byref(c_config), ctypes.byref(handle)), "create")
        assert handle.value is not None
        return cls(handle.value, config, c_config)

    @property
    def block_path(self) -> str:
        return f"/dev/ublkb{self.id}"

    @property
    def path_name(self) -> str:
        return path_name(self.data_path)

    def _live(self) -> int:
        if self._handle is None:
            raise NativeError("device", errno_mod.ENODEV, "the device was destroyed")
        return self._handle

    def start(self) -> None:
        _check(_lib().ubm_dev_start(self._live()), "start")

    @staticmethod
    def remove_orphan(dev_id: int) -> None:
        """STOP_DEV and DEL_DEV of a device whose server died (NativeError: ENOENT, none;
        EBUSY, its server lives; EINVAL, not one that outlives its server)."""
        _check(_lib().ubm_dev_remove_orphan(dev_id), "remove")

    def target(self) -> Target:
        """The device's migration calls."""
        return Target(_lib().ubm_dev_target(self._live()), self)

    def stop(self) -> None:
        _check(_lib().ubm_dev_stop(self._live()), "stop")

    def reconnect(self) -> None:
        """Dial the lost connections of the backend serving the device (an NBD export) again;
        the requests waiting for them go on (blocking; NativeError if the server is not back)."""
        _check(_lib().ubm_reconnect(_lib().ubm_dev_target(self._live())), "reconnect")

    def destroy(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            self._last_stats = self._read_stats(self._handle)
            handle, self._handle = self._handle, None
        _lib().ubm_dev_destroy(handle)

    @staticmethod
    def _read_stats(handle: int) -> dict[str, int]:
        s = _Stats()
        _lib().ubm_dev_stats(handle, ctypes.byref(s))
        return _stats_dict(s)

    def stats(self) -> dict[str, int]:
        with self._lock:
            if self._handle is not None:
                self._last_stats = self._read_stats(self._handle)
            return dict(self._last_stats)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
