"""Real NBD servers as migration destinations, for the tests and the benchmark.

``start_nbd_server(kind, transport, workdir, size)`` starts qemu-nbd or nbdkit exporting
``disk`` over TCP on 127.0.0.1 or a unix socket in ``workdir``, and returns once it accepts
connections.  ``kind``:

- ``qemu-nbd``: a file (``workdir/nbd.img`` unless ``file`` is given), ``--shared=0
  --persistent`` (no client limit, so it offers multi-conn; it outlives its clients);
- ``nbdkit-file``: nbdkit's file plugin on that file;
- ``nbdkit-memory``: nbdkit's memory plugin, ``size`` bytes.

``extra`` goes on the server's command line before the export (e.g. ``-r``, nbdkit's
``--filter=delay``), nbdkit's ``params`` after its plugin (``delay-write=20ms``).  A file
that does not exist is created sparse at ``size``.  ``restart()`` starts a stopped server
again as it was.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("qemu-nbd", "nbdkit-file", "nbdkit-memory")
TRANSPORTS = ("tcp", "unix")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NbdServer:
    kind: str
    transport: str
    uri: str
    proc: subprocess.Popen[bytes]
    file: Path | None  # what a file server exports
    port: int
    sock: Path
    argv: list[str]

    def reachable(self) -> bool:
        try:
            if self.transport == "tcp":
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(self.sock))
            return True
        except OSError:
            return False

    def read_export(self, out: Path) -> Path:
        """The export's bytes, fetched over NBD by qemu-img into ``out``."""
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", self.uri, str(out)],
                       check=True, capture_output=True)  # fmt: skip
        return out

    def restart(self) -> None:
        """Start the server again as it was (same export, port or socket), once stopped."""
        self.stop()
        self.sock.unlink(missing_ok=True)
        again = _start(self.argv, self.kind, self.transport, self.uri, self.file, self.port,
                       self.sock)  # fmt: skip
        self.proc = again.proc

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nbd_server(kind: str, transport: str, workdir: Path, size: int, *,
                     file: Path | None = None, extra: Sequence[str] = (),
                     params: Sequence[str] = ()) -> NbdServer:  # fmt: skip
    if kind not in KINDS or transport not in TRANSPORTS:
        raise ValueError(f"unknown NBD server {kind} over {transport}")
    if kind != "nbdkit-memory":
        file = file or workdir / "nbd.img"
        if not file.exists():
            with open(file, "wb") as f:
                f.truncate(size)
    port = free_tcp_port()
    sock = workdir / f"{kind}-{port}.sock"
    if kind == "qemu-nbd":
        where = ["-b", "127.0.0.1", "-p", str(port)] if transport == "tcp" else ["-k", str(sock)]
        argv = ["qemu-nbd", "-f", "raw", "-x", "disk", "--shared=0", "--persistent", *where,
                *extra, str(file)]  # fmt: skip
    else:
        where = ["-i", "127.0.0.1", "-p", str(port)] if transport == "tcp" else ["-U", str(sock)]
        plugin = ["file", str(file)] if kind == "nbdkit-file" else ["memory", str(size)]
        argv = ["nbdkit", "-f", "-e", "disk", *where, *extra, *plugin, *params]
    uri = f"nbd://127.0.0.1:{port}/disk" if transport == "tcp" else f"nbd+unix:///disk?socket={sock}"
    return _start(argv, kind, transport, uri, file, port, sock)


def _start(argv: list[str], kind: str, transport: str, uri: str, file: Path | None, port: int,
           sock: Path) -> NbdServer:  # fmt: skip
    server = NbdServer(kind, transport, uri, subprocess.Popen(argv, stdin=subprocess.DEVNULL),
                       file, port, sock, argv)  # fmt: skip
    deadline = time.monotonic() + 30
    while not server.reachable():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop(kill=True)
            raise RuntimeError(f"the NBD server did not start: {' '.join(argv)}")
        time.sleep(0.05)
    return server
