"""An NBD server of the tests' own that misbehaves on demand, for the data plane's NBD client.

Real servers (qemu-nbd, nbdkit) are the destinations of the ordinary tests; this one exists
for the faults they cannot be told to make at a chosen moment.  It speaks the fixed newstyle
handshake with NBD_OPT_GO and simple replies, offers multi-conn, FLUSH, FUA and WRITE_ZEROES,
and serves a ``size``-byte export held in memory on a unix socket.  Knobs (any thread):

- ``fail_writes = n``: the next n writes are answered EIO (after ``fail_delay`` seconds);
  ``failed_write`` is set once one was;
- ``silent = True``: requests are taken and never answered (a hung server, or a partition
  that TCP does not notice);
- ``trickle = True``: the handshake answers NBD_OPT_GO with ignorable replies, one every
  ``trickle_interval`` seconds, for ever;
- ``write_back = True``: writes are acknowledged into a cache that only FLUSH (or FUA) makes
  durable; ``restart()`` then loses what was not flushed, as a server with a write-back cache
  that restarts (or one restarted on other storage of the same size) does;
- ``drop()``: closes every connection (the server stays up, as after a network blip);
- ``refuse = "text"``: NBD_OPT_GO is refused by policy, with that message;
- ``flush_delay = s``: each FLUSH is answered that much later;
- ``short_cookies = True``: replies carry only the low 16 bits of the request's cookie (as a
  stale reply for an earlier request on the same tag would).

``data`` is what a client reads back; ``durable`` what survives ``restart()``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_ABORT, OPT_GO = 2, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP, REP_ERR_POLICY = 1, 3, (1 << 31) | 1, (1 << 31) | 2
TF_HAS_FLAGS, TF_SEND_FLUSH, TF_SEND_FUA = 1, 4, 8
TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN = 64, 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA = 1
EIO = 5


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return bytes(buf)


class FaultyNbd:
    def __init__(self, size: int, workdir: Path | None = None) -> None:
        self.size = size
        self.data = bytearray(size)
        self.durable = bytearray(size)
        self.fail_writes = 0
        self.fail_delay = 0.0
        self.silent = False
        self.trickle = False
        self.trickle_interval = 0.2
        self.write_back = False
        self.refuse: str | None = None
        self.flush_delay = 0.0
        self.short_cookies = False
        self.failed_write = threading.Event()
        self.requests: dict[int, int] = {}  # by command type
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._dir = Path(tempfile.mkdtemp(prefix="ubm-fnbd-", dir=workdir or "/tmp"))
        self.socket_path = self._dir / "nbd.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        self._listener.listen(64)
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    # --- faults -------------------------------------------------------------------------
    def drop(self) -> None:
        """Close every client connection now."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def restart(self, lose_unflushed: bool = True) -> None:
        """Drop every connection; with ``lose_unflushed`` forget what no flush made durable."""
        self.drop()
        with self._lock:
            if lose_unflushed:
                self.data[:] = self.durable
            else:
                self.durable[:] = self.data

    def close(self) -> None:
        self._stopping = True
        self.silent = False
        self.trickle = False
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
            self._dir.rmdir()

    def __enter__(self) -> FaultyNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the protocol -------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._handshake(conn):
                self._transmission(conn)
        except (OSError, ConnectionError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _opt_reply(self, conn: socket.socket, opt: int, kind: int, data: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, kind, len(data)) + data)

    def _handshake(self, conn: socket.socket) -> bool:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))  # fixed newstyle, no zeroes
        _recv_exact(conn, 4)
        while True:
            magic, opt, length = struct.unpack(">QII", _recv_exact(conn, 16))
            if magic != IHAVEOPT:
                return False
            _recv_exact(conn, length)
            if opt == OPT_ABORT:
                return False
            if opt != OPT_GO:
                self._opt_reply(conn, opt, REP_ERR_UNSUP)
                continue
            if self.refuse is not None:
                self._opt_reply(conn, opt, REP_ERR_POLICY, self.refuse.encode())
                continue
            while self.trickle and not self._stopping:
                # an information reply of a kind the client does not know: to be ignored
                self._opt_reply(conn, opt, REP_INFO, struct.pack(">H", 0x7FFF))
                time.sleep(self.trickle_interval)
            flags = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES
                     | TF_CAN_MULTI_CONN)  # fmt: skip
            self._opt_reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, self.size, flags))
            self._opt_reply(conn, opt, REP_ACK)
            return True

    def _transmission(self, conn: socket.socket) -> None:
        while True:
            magic, flags, kind, cookie, offset, length = struct.unpack(
                ">IHHQQI", _recv_exact(conn, 28)
            )
            if magic != REQUEST_MAGIC:
                return
            payload = _recv_exact(conn, length) if kind == CMD_WRITE else b""
            with self._lock:
                self.requests[kind] = self.requests.get(kind, 0) + 1
            if kind == CMD_DISC:
                return
            if self.silent:
                continue  # taken, never answered
            error, data = self._execute(kind, flags, offset, length, payload)
            if error:
                self.failed_write.set()
                time.sleep(self.fail_delay)
            if kind == CMD_FLUSH:
                time.sleep(self.flush_delay)
            if self.short_cookies:
                cookie &= 0xFFFF
            reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie)
            conn.sendall(reply + (data if not error else b""))

    def _execute(
        self, kind: int, flags: int, offset: int, length: int, payload: bytes
    ) -> tuple[int, bytes]:
        with self._lock:
            if kind in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM) and self.fail_writes > 0:
                self.fail_writes -= 1
                return EIO, b""
            if kind == CMD_READ:
                return 0, bytes(self.data[offset : offset + length])
            if kind in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM):
                new = payload if kind == CMD_WRITE else bytes(length)
                self.data[offset : offset + length] = new
                if not self.write_back or flags & CMD_FLAG_FUA:
                    self.durable[offset : offset + length] = new
            elif kind == CMD_FLUSH:
                self.durable[:] = self.data
            return 0, b""
