"""The simulator (ubm_sim_*): the data plane without ublk, driven by host tests as a queue
would drive it."""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import os
from collections import deque
from dataclasses import dataclass

from ublkmig.native.device import _Stats, _stats_dict
from ublkmig.native.library import _P, NativeError, Prototypes, _check, _lib
from ublkmig.native.migration import Target


class Op(enum.IntEnum):
    """UBLK_IO_OP_* (for Sim)."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 5


F_FUA = 1 << 13  # UBLK_IO_F_FUA

PROTOS: Prototypes = {
    "ubm_sim_create": (
        ctypes.c_int,
        [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
         ctypes.POINTER(_P)],
    ),
    "ubm_sim_submit": (
        ctypes.c_int,
        [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32,
         ctypes.c_void_p],
    ),
    "ubm_sim_wait": (
        ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    ),
    "ubm_sim_size": (ctypes.c_uint64, [_P]),
    "ubm_sim_stats": (None, [_P, ctypes.POINTER(_Stats)]),
    "ubm_sim_destroy": (None, [_P]),
    "ubm_sim_poll": (ctypes.c_int, [_P]),
    "ubm_sim_set_delay": (ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint64]),
    "ubm_sim_set_wait": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "ubm_sim_target": (_P, [_P]),
}  # fmt: skip


class _Buffer:
    """Request data in memory aligned for O_DIRECT (4096), owned by Python."""

    ALIGN = 4096

    def __init__(self, length: int, data: bytes | None = None) -> None:
        self._raw = ctypes.create_string_buffer(length + self.ALIGN)
        base = ctypes.addressof(self._raw)
        self.address = base + (-base % self.ALIGN)
        if data:
            ctypes.memmove(self.address, data, len(data))

    def read(self, length: int) -> bytes:
        return ctypes.string_at(self.address, length)


@dataclass(frozen=True)
class Completion:
    ticket: int
    result: int  # bytes done, or -errno
    data: bytes | None = None  # what a successful READ read


class Sim:
    """The data plane without ublk (ubm_sim_*): host tests submit requests as a queue would.

    One caller thread at a time.  Buffers of in-flight requests are kept here
    until their completion is collected.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        logical_block_size: int = 512,
        direct: bool = False,
        depth: int = 64,
    ) -> None:
        handle = _P()
        _check(
            _lib().ubm_sim_create(
                os.fsencode(source), logical_block_size, int(direct), depth, ctypes.byref(handle)
            ),
            "sim_create",
        )
        assert handle.value is not None
        self._handle: int | None = handle.value
        self._buffers: dict[int, tuple[Op, _Buffer | None]] = {}
        self._done: deque[Completion] = deque()
        self.logical_block_size = logical_block_size

    def _live(self) -> int:
        if self._handle is None:
            raise NativeError("sim", errno_mod.ENODEV, "the sim was destroyed")
        return self._handle

    @property
    def size(self) -> int:
        return int(_lib().ubm_sim_size(self._live()))

    @property
    def inflight(self) -> int:
        return len(self._buffers)

    def submit(
        self, op: Op, offset: int = 0, length: int = 0, data: bytes | None = None, flags: int = 0
    ) -> int:
        """Submit one request; WRITE takes ``data`` (its length is the request's).

        Returns the ticket; the buffer stays here until the completion is collected.
        """
        op = Op(op)
        buf: _Buffer | None = None
        if op == Op.WRITE:
            if data is None:
                raise ValueError("WRITE needs data")
            length = len(data)
            buf = _Buffer(length, data)
        elif op == Op.READ:
            buf = _Buffer(length)
        addr = buf.address if buf is not None else None
        ticket = _check(
            _lib().ubm_sim_submit(self._live(), int(op), flags, offset, length, addr),
            "sim_submit",
        )
        self._buffers[ticket] = (op, buf)
        return ticket

    def _wait_native(self) -> Completion | None:
        ticket, result = ctypes.c_int(), ctypes.c_int()
        rc = _lib().ubm_sim_wait(self._live(), ctypes.byref(ticket), ctypes.byref(result))
        if rc == -errno_mod.EAGAIN:
            return None
        _check(rc, "sim_wait")
        op, buf = self._buffers.pop(ticket.value, (None, None))
        data = None
        if op == Op.READ and buf is not None and result.value >= 0:
            data = buf.read(result.value)
        return Completion(ticket.value, result.value, data)

    def wait(self) -> Completion | None:
        """The next completion, or None when nothing is in flight."""
        if self._done:
            return self._done.popleft()
        return self._wait_native()

    def run(
        self, op: Op, offset: int = 0, length: int = 0, data: bytes | None = None, flags: int = 0
    ) -> Completion:
        """Submit one request and wait for it (other completions are kept for wait())."""
        ticket = self.submit(op, offset, length, data, flags)
        while True:
            c = self._wait_native()
            if c is None:
                raise NativeError("sim_wait", errno_mod.EAGAIN, f"ticket {ticket} was lost")
            if c.ticket == ticket:
                return c
            self._done.append(c)

    def _ok(self, c: Completion, op: str) -> int:
        if c.result < 0:
            raise NativeError(op, -c.result, "")
        return c.result

    def read(self, offset: int, length: int) -> bytes:
        c = self.run(Op.READ, offset, length)
        self._ok(c, "read")
        assert c.data is not None
        return c.data

    def write(self, offset: int, data: bytes, fua: bool = False) -> int:
        return self._ok(self.run(Op.WRITE, offset, data=data, flags=F_FUA if fua else 0), "write")

    def flush(self) -> int:
        return self._ok(self.run(Op.FLUSH), "flush")

    def discard(self, offset: int, length: int) -> int:
        return self._ok(self.run(Op.DISCARD, offset, length), "discard")

    def write_zeroes(self, offset: int, length: int) -> int:
        return self._ok(self.run(Op.WRITE_ZEROES, offset, length), "write_zeroes")

    def stats(self) -> dict[str, int]:
        s = _Stats()
        _lib().ubm_sim_stats(self._live(), ctypes.byref(s))
        return _stats_dict(s)

    def target(self) -> Target:
        """The simulator's migration calls (see Target for which thread may make them)."""
        return Target(_lib().ubm_sim_target(self._live()), self)

    def poll(self) -> None:
        """Run the ring without waiting (completions are collected by wait())."""
        _check(_lib().ubm_sim_poll(self._live()), "sim_poll")

    def set_delay(self, slot: int, ns: int) -> None:
        """Delay every write/discard/write-zeroes/flush to the source (0) or destination (1)."""
        _check(_lib().ubm_sim_set_delay(self._live(), slot, ns), "sim_set_delay")

    def set_wait(self, seconds: float) -> None:
        """How long a request waits for a lost connection of an NBD source (0: 60 s)."""
        _check(_lib().ubm_sim_set_wait(self._live(), round(seconds * 1000)), "sim_set_wait")

    def reconnect(self) -> None:
        """Dial an NBD source's lost connections again; the requests waiting go on."""
        _check(_lib().ubm_reconnect(_lib().ubm_sim_target(self._live())), "reconnect")

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _lib().ubm_sim_destroy(handle)
            self._buffers.clear()

    def __enter__(self) -> Sim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
