"""What the benchmark's fio runs against: the backing file itself, ublkmig serving it, and
the kernel's selftest ublk server (kublk) serving it.

Each target is a context manager yielding a :class:`Target`: the path fio opens and the
server's process (for its CPU time), or none for the raw file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ublkmig.client import Client
from ublkmig.vm import cache_dir


class TargetError(RuntimeError):
    """A server would not start or stop."""


@dataclass
class Target:
    name: str  # as the report shows it: "raw", "ublkmig auto-zc", "kublk zc", ...
    path: str  # what fio opens
    pid: int | None = None  # the serving process (CPU per I/O), None for the raw file
    data_path: str = ""  # copy, zc, auto-zc ("" for the raw file)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far, every thread."""
        if self.pid is None:
            return 0.0
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss(self) -> int | None:
        """The server's peak resident memory so far (VmHWM), bytes; None for the raw file."""
        if self.pid is None:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None


def set_scheduler_none(device: str) -> None:
    """No I/O scheduler on a benchmarked device (a ublk device's default is mq-deadline)."""
    sched = Path(f"/sys/block/{Path(device).name}/queue/scheduler")
    if sched.exists():
        sched.write_text("none")


@contextmanager
def raw(image: Path) -> Iterator[Target]:
    yield Target("raw file", str(image))


@contextmanager
def ublkmig(image: Path, *, queues: int, depth: int, data_path: str = "auto",
            direct: bool = False, log: Path | None = None) -> Iterator[Target]:  # fmt: skip
    """``ublkmig serve IMAGE`` in the background; stopped with SIGTERM on exit.  ``direct``:
    O_DIRECT on the image, as kublk's loop target always opens its file."""
    # --force: every repetition serves the image again that the last one migrated away from
    # (put back as it was): the bench knows it is the disk it means
    argv = [sys.executable, "-m", "ublkmig", "serve", str(image), f"--queues={queues}",
            f"--depth={depth}", f"--data-path={data_path}", "--force",
            *(["--direct"] if direct else [])]
    errf = open(log or os.devnull, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        assert proc.stdout is not None
        device = proc.stdout.readline().strip()
        if not device.startswith("/dev/ublkb"):
            proc.wait(timeout=30)
            raise TargetError(f"ublkmig serve failed: {_tail(log)}")
        used = Client(device, timeout=30.0).info()["data_path"]
        set_scheduler_none(device)
        yield Target(f"ublkmig {used}", device, proc.pid, used)
    finally:
        _stop(proc, argv)
        errf.close()


def kublk_binary() -> Path:
    return cache_dir() / "kublk" / "kublk"


# kublk's data modes: the report's name, and the options of `kublk add`
KUBLK_MODES = {"copy": [], "zc": ["-z"], "auto-zc": ["--auto_zc"]}


@contextmanager
def kublk(image: Path, *, queues: int, depth: int, mode: str) -> Iterator[Target]:
    """The kernel's selftest server, loop target, serving ``image``; deleted on exit."""
    exe = kublk_binary()
    if not exe.is_file():
        raise TargetError(f"{exe} is missing: run `ci/kernels kublk` (as root) to build it")
    argv = [str(exe), "add", "-t", "loop", "-q", str(queues), "-d", str(depth),
            *KUBLK_MODES[mode], str(image)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    m = re.search(r"dev id (\d+)", r.stdout + r.stderr)
    if r.returncode != 0 or not m:
        raise TargetError(f"{' '.join(argv)} failed ({r.returncode}): "
                          f"{(r.stdout + r.stderr).strip()[-500:]}")  # fmt: skip
    dev_id = int(m.group(1))
    device = f"/dev/ublkb{dev_id}"
    try:
        pid = _kublk_pid(exe)
        _wait_node(device)
        set_scheduler_none(device)
        yield Target(f"kublk {mode}", device, pid, mode)
    finally:
        subprocess.run([str(exe), "del", "-n", str(dev_id)], capture_output=True, timeout=60)


def _kublk_pid(exe: Path) -> int | None:
    """The daemon ``kublk add`` left behind (the benchmark runs one at a time)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "exe")) == exe.resolve():
                    return int(proc.name)
            except OSError:
                continue
    return None


def _wait_node(device: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not Path(device).exists():
        if time.monotonic() > end:
            raise TargetError(f"{device} did not appear")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str], argv: list[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TargetError(f"{' '.join(argv)} did not stop on SIGTERM") from None


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return log.read_text(errors="replace").strip()[-1000:]
