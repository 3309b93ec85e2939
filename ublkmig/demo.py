"""``ublkmig demo``: the whole life of a device, step by step, on a throw-away image.

Create a sparse image on /dev/shm, serve it (``python -m ublkmig serve`` as a
child, reading the device path from its first stdout line), mkfs.ext4, mount,
write files, remount, check their sha256, unmount, ``fsck -fn``.  Then the
live migration: mount again, and while a writer keeps writing files, move the
device to a new file with ``ublkmig migrate DEVICE --to DEST --wait`` (auto
mode, the default: mirroring unless the destination is slow); check every
file's sha256 on the device (now served from DEST), ``fsck -fn``, compare DEST
with the device byte for byte, and report the migration's time and cutover
stall.  Finally stop the daemon with ``ublkmig stop`` and
remove the images.  Without a ublk driver on this host it re-runs itself inside
a kernel VM (ublkmig.vm) and relays the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.markup import escape

from ublkmig import daemon
from ublkmig.client import Client
from ublkmig.errors import UblkmigError, UserError
from ublkmig.units import format_size

SERVE_TIMEOUT = 120.0  # kernel VMs under emulation are slow
STOP_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 600.0
WRITER_FILES_AFTER = 8  # files the writer writes after the cutover, before it stops
TOOLS = ("mkfs.ext4", "fsck.ext4", "mount", "umount")


class DemoFailed(UblkmigError):
    pass


def run(size: int, in_vm: bool = False) -> int:
    """The demo's exit status: 0 if every step passed."""
    console = Console(highlight=False, soft_wrap=True)
    if not in_vm:
        from ublkmig import vm

        if not vm.have_ublk():
            console.print(
                f"This host's kernel (Linux {os.uname().release}) has no ublk driver: running the "
                "demo inside a kernel VM (Debian unstable's Linux, about a minute)."
            )
            argv = [sys.executable, "-m", "ublkmig", "demo", "--in-vm", "--size", str(size)]
            result = vm.run_in_vm(argv, kernel="unstable")
            status = "[green]passed[/]" if result.returncode == 0 else "[red]failed[/]"
            console.print(
                f"The demo {status} in the VM (Linux {escape(result.kernel_release)}, "
                f"exit status {result.returncode})."
            )
            return result.returncode
    daemon.check_root()
    missing = [t for t in TOOLS if not _which(t)]
    if missing:
        raise UserError(
            f"the demo needs {', '.join(missing)} (Debian: apt install e2fsprogs mount)"
        )
    daemon.ensure_driver()
    return Demo(console, size).run()


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


class Demo:
    def __init__(self, console: Console, size: int) -> None:
        self.console = console
        self.size = size
        self.tmp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.dev = ""
        self.dev_id = -1
        self.mnt: Path | None = None
        self.mounted = False
        self.files: dict[str, str] = {}  # name -> sha256
        self.dest: Path | None = None
        self.reported = False  # a failed step printed its error

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            with self.console.status(escape(text)):
                yield
        except Exception as e:
            self.console.print(f"[red]✗[/] {escape(text)}: {escape(str(e))}")
            self.reported = True
            raise
        self.console.print(f"[green]✓[/] {escape(text)} [dim]({time.monotonic() - t0:.1f} s)[/]")

    def note(self, text: str) -> None:
        self.console.print(f"  [dim]{escape(text)}[/]")

    def run(self) -> int:
        try:
            self._steps()
        except (UblkmigError, OSError, subprocess.SubprocessError) as e:
            if not self.reported:
                self.console.print(f"[red]✗[/] {escape(str(e))}")
            self._daemon_log_tail()
            self.console.print("[bold red]demo failed[/]")
            return 1
        finally:
            self._cleanup()
        self.console.print("[bold green]demo passed[/]")
        return 0

    def _steps(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with self.step(f"create a sparse {format_size(self.size)} image in {base or 'tmp'}"):
            self.tmp = Path(tempfile.mkdtemp(prefix="ublkmig-demo-", dir=base))
            image = self.tmp / "disk.img"
            with open(image, "wb") as f:
                f.truncate(self.size)
            self.mnt = self.tmp / "mnt"
            self.mnt.mkdir()
        self.note(str(image))

        with self.step("serve it: python -m ublkmig serve disk.img"):
            self._serve(image)
        info = Client(self.dev_id).info()
        self.note(
            f"{self.dev}: data path {info['data_path']}, {info['queues']} queue(s) x depth "
            f"{info['depth']}, daemon pid {info['pid']}"
        )

        with self.step(f"mkfs.ext4 {self.dev}"):
            _run(["mkfs.ext4", "-q", "-F", self.dev])
        with self.step(f"mount {self.dev} on {self.mnt}"):
            self._mount()
        with self.step("write files"):
            total = self._write_files()
            _run(["sync"])
        self.note(f"{len(self.files)} files, {format_size(total)}")
        with self.step("unmount and mount again"):
            self._umount()
            self._mount()
        with self.step("check the files' sha256"):
            self._check_files()
        with self.step("unmount"):
            self._umount()
        with self.step(f"fsck.ext4 -fn {self.dev}"):
            _run(["fsck.ext4", "-fn", self.dev])
        self._migration()
        stats = Client(self.dev_id).info()["stats"]
        self.note(
            f"the daemon served {stats['reads']} reads ({format_size(stats['read_bytes'])}), "
            f"{stats['writes']} writes ({format_size(stats['write_bytes'])}), "
            f"{stats['flushes']} flushes, {stats['discards']} discards, {stats['errors']} errors"
        )
        with self.step(f"stop the daemon: ublkmig stop {self.dev}"):
            _run([sys.executable, "-m", "ublkmig", "stop", self.dev])
            assert self.proc is not None
            try:
                rc = self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise DemoFailed(f"the daemon did not exit within {STOP_TIMEOUT:.0f} s") from None
            self.proc = None
            if rc != 0:
                raise DemoFailed(f"the daemon exited with status {rc}")
            if os.path.exists(self.dev):
                raise DemoFailed(f"{self.dev} still exists")
        with self.step("remove the images"):
            assert self.tmp is not None
            shutil.rmtree(self.tmp)
            self.tmp = None

    def _migration(self) -> None:
        """Live migration to a new file while a writer keeps writing files."""
        assert self.tmp is not None and self.mnt is not None
        self.dest = self.tmp / "dest.img"
        with self.step(f"mount {self.dev} again and start a writer"):
            self._mount()
            writer = FileWriter(self.mnt / "live", budget=min(self.size // 8, 24 << 20))
            writer.start()
            writer.wait_files(4)
        try:
            cmd = f"ublkmig migrate {self.dev} --to {self.dest.name} --wait"
            with self.step(f"migrate while the writer writes: {cmd}"):
                written_before = writer.count
                r = subprocess.run(
                    [sys.executable, "-m", "ublkmig", "migrate", self.dev, "--to",
                     str(self.dest), "--wait"],
                    capture_output=True, text=True, timeout=MIGRATE_TIMEOUT,
                )  # fmt: skip
                if r.returncode != 0:
                    out = (r.stderr.strip() or r.stdout.strip()).splitlines()
                    raise DemoFailed(out[-1] if out else f"migrate exited {r.returncode}")
                during = writer.count - written_before
                writer.stop(after=WRITER_FILES_AFTER)
            status = Client(self.dev_id).status()
            mig = status["migration"]
            self.note(
                f"{mig['mode']} migration completed in {mig['elapsed']:.1f} s; cutover stall "
                f"(longest guest I/O within 1 s of the switch) {_ms(mig['cutover_stall_ms'])}, "
                f"longest guest I/O during the migration {_ms(mig['max_latency_ms'])}; "
                f"{format_size(mig['bytes_copied'])} copied, "
                f"{format_size(mig['bytes_skipped'])} skipped (holes)"
            )
            self.note(
                f"the writer wrote {during} files during the migration and "
                f"{WRITER_FILES_AFTER} after it; {self.dev} now serves {status['image']}"
            )
        finally:
            writer.halt()
        if writer.error is not None:
            raise DemoFailed(f"the writer failed: {writer.error}")
        self.files.update({f"live/{n}": d for n, d in writer.sums.items()})
        with self.step("sync, unmount and mount again, check every file's sha256"):
            _run(["sync"])
            self._umount()
            self._mount()
            self._check_files()
        self.note(f"{len(self.files)} files, read from {self.dest.name}")
        with self.step(f"unmount, fsck.ext4 -fn {self.dev}"):
            self._umount()
            _run(["fsck.ext4", "-fn", self.dev])
        with self.step(f"compare {self.dest.name} with {self.dev} byte for byte"):
            _compare(self.dev, self.dest, self.size)

    def _serve(self, image: Path) -> None:
        assert self.tmp is not None
        log = open(self.tmp / "daemon.log", "wb")  # noqa: SIM115 - the child holds it
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ublkmig", "serve", str(image)],
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # a Ctrl-C here must not stop it under the mount
            )
        self.dev = _first_line(self.proc, SERVE_TIMEOUT)
        if not self.dev.startswith("/dev/ublkb"):
            raise DemoFailed(f"serve printed {self.dev!r} instead of a device path")
        self.dev_id = int(self.dev.removeprefix("/dev/ublkb"))

    def _mount(self) -> None:
        _run(["mount", "-t", "ext4", self.dev, str(self.mnt)])
        self.mounted = True

    def _umount(self) -> None:
        _run(["umount", str(self.mnt)])
        self.mounted = False

    def _write_files(self) -> int:
        assert self.mnt is not None
        rng = random.Random(0x75626C6B)
        budget = min(self.size // 8, 32 << 20)
        total = 0
        (self.mnt / "dir" / "sub").mkdir(parents=True)
        for i in range(16):
            n = rng.randrange(1, max(2, budget // 8))
            if total + n > budget:
                break
            name = f"dir/sub/file{i}.bin" if i % 3 == 0 else f"file{i}.bin"
            data = os.urandom(n)
            (self.mnt / name).write_bytes(data)
            self.files[name] = hashlib.sha256(data).hexdigest()
            total += n
        return total

    def _check_files(self) -> None:
        assert self.mnt is not None
        bad = [
            name
            for name, digest in self.files.items()
            if hashlib.sha256((self.mnt / name).read_bytes()).hexdigest() != digest
        ]
        if bad:
            raise DemoFailed(f"{len(bad)} of {len(self.files)} files differ: {', '.join(bad)}")

    def _daemon_log_tail(self, lines: int = 20) -> None:
        if self.tmp is None:
            return
        with contextlib.suppress(OSError):
            text = (self.tmp / "daemon.log").read_text(errors="replace").splitlines()
            if text:
                self.console.print("[dim]last lines of the daemon's log:[/]")
                for line in text[-lines:]:
                    self.console.print(f"  [dim]{escape(line)}[/]")

    def _cleanup(self) -> None:
        if self.mounted and self.mnt is not None:
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        out = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise DemoFailed(
            f"{' '.join(argv)} exited with status {r.returncode}" + (f": {out[-1]}" if out else "")
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _compare(device: str, path: Path, size: int) -> None:
    """The device's bytes are the file's (DemoFailed naming the first differing MiB)."""
    _run(["blockdev", "--flushbufs", device])  # read what the daemon serves
    step = 1 << 20
    with open(device, "rb", buffering=0) as a, open(path, "rb", buffering=0) as b:
        for off in range(0, size, step):
            if _read(a, step) != _read(b, step):
                raise DemoFailed(f"{path} and {device} differ in the MiB at {off >> 20} MiB")


def _read(f: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        block = f.read(n)
        if not block:
            break
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


class FileWriter(threading.Thread):
    """Writes files of random sizes with random bytes into ``root`` in a loop, each fsynced,
    remembering their sha256; deletes the oldest to stay under ``budget`` bytes."""

    def __init__(self, root: Path, budget: int) -> None:
        super().__init__(daemon=True, name="demo-writer")
        self.root = root
        self.budget = budget
        self.sums: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.count = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._until: int | None = None
        self._cond = threading.Condition()

    def run(self) -> None:
        rng = random.Random(0x6D6967)
        try:
            self.root.mkdir(exist_ok=True)
            while not self._halt.is_set():
                name = f"w{self.count:05d}.bin"
                data = os.urandom(rng.choice([1, 4096, 65536 + 7, 200_000, 1 << 20]))
                with open(self.root / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.sums[name] = hashlib.sha256(data).hexdigest()
                self.sizes[name] = len(data)
                while sum(self.sizes.values()) > self.budget:
                    old = min(self.sizes)
                    (self.root / old).unlink()
                    del self.sums[old], self.sizes[old]
                with self._cond:
                    self.count += 1
                    if self._until is not None and self.count >= self._until:
                        self._halt.set()
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - the demo reports it
            self.error = e
            with self._cond:
                self._cond.notify_all()

    def wait_files(self, n: int, timeout: float = 120.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.count >= n or self.error is not None, timeout)
        if self.error is not None:
            raise DemoFailed(f"the writer failed: {self.error}")

    def stop(self, after: int, timeout: float = 120.0) -> None:
        """Stop once ``after`` more files are written."""
        with self._cond:
            self._until = self.count + after
        self.join(timeout)
        if self.is_alive():
            raise DemoFailed(f"the writer did not stop within {timeout:.0f} s")

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(STOP_TIMEOUT)


def _first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of ``proc`` (without the newline), or DemoFailed."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DemoFailed(f"serve printed no device path within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise DemoFailed(f"serve exited with status {proc.wait()} before a device path")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()
