"""The QEMU peer of the benchmark: the same disk moved by QEMU's ``blockdev-mirror``.

``QemuMirrorPeer(image, workdir)`` starts ``qemu-storage-daemon`` (qsd) serving
``image`` as a writable NBD export on a unix socket, and attaches the kernel's NBD
client to it, so the workload (fio) runs on ``/dev/nbdN`` exactly as it runs on
``/dev/ublkbN``.  ``peer.mirror(dest, copy_mode)`` then moves the disk to ``dest`` with
a ``blockdev-mirror`` job (sync=full) and completes it, which pivots the export onto
the destination, and reports how long that took.

qsd's command line (``QemuMirrorPeer.argv``), with ``direct=False, aio="io_uring"``::

    qemu-storage-daemon \\
      --blockdev driver=file,node-name=src-file,filename=IMAGE,aio=io_uring,cache.direct=off \\
      --blockdev driver=raw,node-name=src,file=src-file \\
      --nbd-server addr.type=unix,addr.path=WORKDIR/nbd.sock \\
      --export type=nbd,id=export0,node-name=src,name=disk,writable=on \\
      --chardev socket,id=qmp0,path=WORKDIR/qmp.sock,server=on,wait=off \\
      --monitor chardev=qmp0

The QMP of one ``mirror()`` (job ``mirror1``, target node ``dst1``)::

    blockdev-add {driver: raw, node-name: dst1,
                  file: {driver: file, filename: DEST, aio: io_uring,
                         cache: {direct: false}}}
    blockdev-mirror {job-id: mirror1, device: src, target: dst1, sync: full,
                     copy-mode: background | write-blocking, auto-dismiss: false
                     [, speed: N]}
    ... JOB_STATUS_CHANGE ready / BLOCK_JOB_READY
    block-job-complete {device: mirror1}
    ... BLOCK_JOB_COMPLETED, JOB_STATUS_CHANGE concluded
    query-jobs                       (progress and error of the concluded job)
    job-dismiss {id: mirror1}
    query-block-exports              (the export now serves dst1)

Notes (QEMU 7.2, Debian bookworm):

- Completion pivots: the mirror replaces the source node by the target in every
  parent, the NBD export's BlockBackend included (``query-block-exports`` then names
  the target node).  ``mirror()`` checks that and raises if it did not happen.
- 7.2's NBD server advertises multi-conn only for read-only exports (it has no
  ``multi-conn`` export option), yet nbd-client 3.24 connects ``-C 2`` to it all the
  same: the device then has one blk-mq queue per connection, like ublk's queues.  That
  is safe here although the NBD spec would not promise it (a flush on one connection
  covering writes answered on another): qsd serves every connection from one
  BlockBackend, and a flush flushes the node.  ``connections=1`` if in doubt.
- QMP is spoken by the small synchronous client below (``Qmp``): QEMU's own
  ``qemu.qmp`` package is asyncio based, and its synchronous wrapper
  (``qemu.qmp.legacy``) exists for QEMU's in-tree scripts; thirty lines of
  JSON-over-a-unix-socket avoid a dependency.
- Without the kernel NBD client (``client="none"``), fio can reach the export itself:
  ``--ioengine=nbd --uri=<peer.nbd_uri>`` (fio's libnbd engine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

QSD = "qemu-storage-daemon"
EXPORT = "disk"
SOURCE_NODE = "src"
CopyMode = Literal["background", "write-blocking"]


class QmpError(RuntimeError):
    """QMP failed: an error answer, a closed socket or a timeout."""


class MirrorError(RuntimeError):
    """The peer could not be set up, or a mirror did not behave (not: the job failed,
    which ``MirrorResult.error`` reports)."""


# ---- QMP ------------------------------------------------------------------------------


class Qmp:
    """A synchronous QMP client on a unix socket.

    Events that arrive while waiting for an answer are kept, with the monotonic time
    they were read, in ``events`` until ``wait_event`` consumes them; every event also
    goes to ``timeline`` (never consumed).
    """

    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.timeline: list[tuple[float, dict[str, Any]]] = []
        self._buf = b""
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
            greeting = self._read(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QMP: timed out")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError("QMP: timed out") from None
            if not chunk:
                raise QmpError("QMP: the connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        if "event" in msg:
            entry = (time.monotonic(), msg)
            self.events.append(entry)
            self.timeline.append(entry)
        return msg

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run ``command`` (argument names as in QMP: pass ``**{"job-id": ...}``) and
        return its ``return`` value; QmpError on an error answer."""
        self._next_id += 1
        cid = f"c{self._next_id}"
        req: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._read(deadline)
            if msg.get("id") != cid:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    def wait_event(self, match: Any, timeout: float) -> tuple[float, dict[str, Any]]:
        """The first event (kept or new) for which ``match(event)`` holds, with the time
        it was read; earlier kept events are dropped.  QmpError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                t, ev = self.events.pop(0)
                if match(ev):
                    return t, ev
            self._read(deadline)


# ---- the result -------------------------------------------------------------------------


@dataclass
class MirrorResult:
    """One mirror job, start (``blockdev-mirror``) to completion."""

    copy_mode: str
    dest: Path
    elapsed: float  # seconds: blockdev-mirror -> BLOCK_JOB_COMPLETED
    ready_after: float | None  # seconds: blockdev-mirror -> READY (None: never ready)
    offset: int  # the job's progress at the end (query-jobs current-progress) ...
    length: int  # ... of total-progress (grows as guest writes re-dirty copied areas)
    # (monotonic time, event) from blockdev-mirror on; JOB_STATUS_CHANGE is written
    # "JOB_STATUS_CHANGE:<status>"
    timeline: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None  # the job's error, if it failed
    complete_after: float | None = None  # seconds: blockdev-mirror -> block-job-complete sent
    node: str = ""  # the target node the export serves from afterwards

    @property
    def cutover(self) -> float | None:
        """Seconds from block-job-complete to BLOCK_JOB_COMPLETED (the final drain)."""
        return None if self.complete_after is None else self.elapsed - self.complete_after


def _event_name(ev: dict[str, Any]) -> str:
    if ev["event"] == "JOB_STATUS_CHANGE":
        return f"JOB_STATUS_CHANGE:{ev.get('data', {}).get('status')}"
    return str(ev["event"])


# ---- the peer -------------------------------------------------------------------------


class QemuMirrorPeer:
    """qemu-storage-daemon serving ``image`` over NBD, plus the kernel NBD client.

    ``with QemuMirrorPeer(image, workdir) as peer:`` -- ``peer.device`` is the
    ``/dev/nbdN`` to run the workload on (``client="kernel"``); ``peer.nbd_uri`` is the
    export for fio's nbd engine.  Leaving the block disconnects the device and quits
    qsd, whatever happened.

    ``connections``: NBD connections (= the device's queues; 2 like the tests' ublk
    devices), ``nbd_timeout``: seconds before the kernel gives up on a request (generous:
    TCG guests are slow), ``block_size``: the device's logical block size.
    ``direct``: open the files with O_DIRECT (``cache.direct=on``).  Off by default, as
    ublkmig's daemon (``ublkmig serve`` without ``--direct``): compare like with like
    and pass the same choice to both.  ``aio``: ``io_uring`` (like ublkmig's backend)
    or ``native`` (Linux AIO, which QEMU allows only with ``direct``) or ``threads``.
    """

    def __init__(self, image: Path, workdir: Path, *, direct: bool = False,
                 aio: Literal["io_uring", "native", "threads"] = "io_uring",
                 client: Literal["kernel", "none"] = "kernel", connections: int = 2,
                 nbd_timeout: int = 120, block_size: int = 512,
                 start_timeout: float = 120.0, qsd: str = QSD) -> None:
        if aio == "native" and not direct:
            raise ValueError("aio=native needs direct=True (QEMU refuses it otherwise)")
        self.image = Path(image).resolve()
        self.workdir = Path(workdir).resolve()
        self.direct, self.aio, self.client = direct, aio, client
        self.connections, self.nbd_timeout, self.block_size = connections, nbd_timeout, block_size
        self.start_timeout = start_timeout
        self.qsd = qsd
        self.qmp_path = self.workdir / "qmp.sock"
        self.nbd_path = self.workdir / "nbd.sock"
        self.log_path = self.workdir / "qsd.log"
        self.device: str | None = None
        self.node = SOURCE_NODE  # the node the export serves
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self._jobs = 0

    # -- the command line

    def _file_opts(self, node: str, path: Path) -> str:
        # the image path may hold commas: QEMU's option syntax doubles them
        name = str(path).replace(",", ",,")
        return (f"driver=file,node-name={node},filename={name},aio={self.aio},"
                f"cache.direct={'on' if self.direct else 'off'}")

    @property
    def argv(self) -> list[str]:
        nbd = str(self.nbd_path).replace(",", ",,")
        qmp = str(self.qmp_path).replace(",", ",,")
        return [
            self.qsd,
            "--blockdev", self._file_opts(f"{SOURCE_NODE}-file", self.image),
            "--blockdev", f"driver=raw,node-name={SOURCE_NODE},file={SOURCE_NODE}-file",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", f"type=nbd,id=export0,node-name={SOURCE_NODE},name={EXPORT},"
                        "writable=on",
            # last: qsd answers on QMP only after every option above took effect
            "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        ]

    @property
    def nbd_uri(self) -> str:
        """The export as an NBD URI (fio: ``--ioengine=nbd --uri=...``)."""
        return f"nbd+unix:///{EXPORT}?socket={self.nbd_path}"

    # -- start and stop

    def __enter__(self) -> QemuMirrorPeer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.qmp_path, self.nbd_path):
            p.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise MirrorError(f"qemu-storage-daemon exited {self.proc.returncode}:"
                                  f" {self.log_tail()}")
            try:
                self.qmp = Qmp(self.qmp_path, timeout=self.start_timeout)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise MirrorError(f"qemu-storage-daemon did not open {self.qmp_path}"
                                      f" within {self.start_timeout:.0f} s") from None
                time.sleep(0.05)
        if self.client == "kernel":
            self.device = self._attach()

    def _attach(self) -> str:
        """Connect a free /dev/nbdN to the export (nbd-client over netlink: it hands the
        socket to the kernel and exits) and wait until it has the disk's size."""
        if shutil.which("nbd-client") is None:
            raise MirrorError("nbd-client is missing (Debian package nbd-client)")
        if not Path("/sys/module/nbd").exists():
            r = subprocess.run(["modprobe", "nbd"], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise MirrorError(f"modprobe nbd failed: {r.stderr.strip()}")
        size = self.image.stat().st_size
        for _ in range(3):  # another user may take a free device first
            dev = _free_nbd()
            r = subprocess.run(
                ["nbd-client", "-unix", str(self.nbd_path), dev, "-N", EXPORT,
                 "-b", str(self.block_size), "-t", str(self.nbd_timeout),
                 *(["-C", str(self.connections)] if self.connections > 1 else [])],
                capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
        else:
            raise MirrorError(f"nbd-client failed (rc {r.returncode}): {r.stderr.strip()}"
                              f" {r.stdout.strip()}")
        self.device = dev
        name = Path(dev).name
        deadline = time.monotonic() + 30
        while _sysfs_int(f"/sys/block/{name}/size") * 512 != size:
            if time.monotonic() > deadline:
                raise MirrorError(f"{dev} did not get the size {size} after nbd-client")
            time.sleep(0.05)
        return dev

    def close(self) -> None:
        """Disconnect the NBD device and quit qsd (idempotent; never raises for a
        teardown problem, which ends up in qsd.log or is ignored)."""
        if self.device is not None:
            dev, self.device = self.device, None
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["nbd-client", "-d", dev], capture_output=True, timeout=60)
            pid = Path(f"/sys/block/{Path(dev).name}/pid")
            deadline = time.monotonic() + 30
            while pid.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.qmp is not None:
            qmp, self.qmp = self.qmp, None
            with contextlib.suppress(QmpError, OSError):
                qmp.execute("quit", timeout=10)
            qmp.close()
        if self.proc is not None:
            proc, self.proc = self.proc, None
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                try:
                    proc.wait(15)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    # -- QMP helpers

    def _qmp(self) -> Qmp:
        if self.qmp is None:
            raise MirrorError("the peer is not running")
        return self.qmp

    def export_node(self) -> str:
        """The node the NBD export serves now (query-block-exports)."""
        for e in self._qmp().execute("query-block-exports"):
            if e["id"] == "export0":
                return str(e["node-name"])
        raise MirrorError("the NBD export is gone")

    def job(self, job_id: str) -> dict[str, Any] | None:
        for j in self._qmp().execute("query-jobs"):
            if j["id"] == job_id:
                return dict(j)
        return None

    # -- the migration

    def mirror(self, dest: Path, copy_mode: CopyMode = "background", speed: int = 0, *,
               timeout: float = 900.0) -> MirrorResult:
        """Move the served disk to ``dest`` (created at the disk's size if missing) with a
        full ``blockdev-mirror`` in ``copy_mode``, capped at ``speed`` bytes/s (0: no
        cap); once READY complete it, which pivots the export onto ``dest``.

        A job that fails is reported in ``MirrorResult.error`` (its target node is then
        removed again); MirrorError/QmpError when QMP misbehaves or ``timeout`` passes.
        """
        if copy_mode not in ("background", "write-blocking"):
            raise ValueError(f"copy_mode: {copy_mode!r}")
        qmp = self._qmp()
        dest = Path(dest).resolve()
        size = self.image.stat().st_size
        if not dest.exists():
            with open(dest, "wb") as f:
                f.truncate(size)
        elif dest.stat().st_size != size:
            raise MirrorError(f"{dest} has {dest.stat().st_size} bytes, the disk {size}")
        self._jobs += 1
        job_id, node = f"mirror{self._jobs}", f"dst{self._jobs}"
        qmp.execute("blockdev-add", driver="raw", **{"node-name": node},
                    file={"driver": "file", "filename": str(dest), "aio": self.aio,
                          "cache": {"direct": self.direct}})
        source = self.node
        qmp.events.clear()
        args: dict[str, Any] = {"job-id": job_id, "device": source, "target": node,
                                "sync": "full", "copy-mode": copy_mode,
                                "auto-dismiss": False}
        if speed:
            args["speed"] = speed
        t0 = time.monotonic()
        first_event = len(qmp.timeline)
        qmp.execute("blockdev-mirror", **args)
        deadline = t0 + timeout

        def status(ev: dict[str, Any]) -> str | None:
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == job_id:
                return str(ev["data"]["status"])
            return None

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        ready_after = complete_after = None
        try:
            t_ready, ev = qmp.wait_event(lambda e: status(e) in ("ready", "concluded"), left())
            if status(ev) == "ready":
                ready_after = t_ready - t0
                complete_after = time.monotonic() - t0
                qmp.execute("block-job-complete", device=job_id)
                qmp.wait_event(lambda e: status(e) == "concluded", left())
        except QmpError:  # a timeout, most likely: do not leave the job running
            with contextlib.suppress(QmpError, OSError):
                qmp.execute("job-cancel", id=job_id, timeout=10)
            raise
        t_end = next((t for t, e in reversed(qmp.timeline[first_event:])
                      if e["event"] == "BLOCK_JOB_COMPLETED"
                      and e["data"]["device"] == job_id), time.monotonic())
        info = self.job(job_id) or {}
        qmp.execute("job-dismiss", id=job_id)
        error = info.get("error")
        if error is None and ready_after is None:
            error = "the job concluded without becoming ready"
        if error is None:
            self.node = self.export_node()
            if self.node != node:
                raise MirrorError(f"the mirror completed but the export serves {self.node},"
                                  f" not the target {node}")
        else:
            with contextlib.suppress(QmpError):
                qmp.execute("blockdev-del", **{"node-name": node})
        timeline = [(t, _event_name(e)) for t, e in qmp.timeline[first_event:]]
        return MirrorResult(copy_mode=copy_mode, dest=dest, elapsed=t_end - t0,
                            ready_after=ready_after, offset=int(info.get("current-progress", 0)),
                            length=int(info.get("total-progress", 0)), timeline=timeline,
                            error=error, complete_after=complete_after,
                            node=self.node if error is None else "")


def _sysfs_int(path: str) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _free_nbd() -> str:
    """A /dev/nbdN with no connection (no ``pid`` in sysfs, size 0)."""
    for sys_dev in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
        if not (sys_dev / "pid").exists() and _sysfs_int(f"{sys_dev}/size") == 0:
            return f"/dev/{sys_dev.name}"
    raise MirrorError("no free /dev/nbdN (modprobe nbd nbds_max=... for more)")
