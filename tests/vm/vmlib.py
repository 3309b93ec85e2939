"""Helpers of the real-device tests (tests/vm): the daemon and its device, fio, data,
migrations.

Used by conftest.py's fixtures and imported by the tests (``from vmlib import ...``).  What
the host tests need too (the CLI as a child process, its one-line errors, a spawned
``serve``, sparse images) is in tests/support.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.cli import UBLKMIG, run_cli
from support.serve import SERVE_TIMEOUT, STOP_TIMEOUT, ServeFailed
from support.serve import Served as ServedChild

from ublkmig.client import Client, WaitTimeout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
IN_VM = os.environ.get("UBLKMIG_IN_VM") == "1"
KERNEL = os.environ.get("UBLKMIG_VM_KERNEL", "")
CONTROL = Path("/dev/ublk-control")

ALL_PATHS = ("auto-zc", "zc", "copy")
# what each kernel the CI boots must offer, and what `auto` must pick there
KERNEL_PATHS: dict[str, tuple[str, ...]] = {"unstable": ALL_PATHS, "lts": ("copy",)}
KERNEL_AUTO: dict[str, str] = {"unstable": "auto-zc", "lts": "copy"}

MakeImage = Callable[..., Path]  # the make_image fixture


def data_paths() -> tuple[str, ...]:
    """The data paths the running kernel offers (for parametrizing; no driver call needed
    in CI, where the kernel's name says it)."""
    if KERNEL in KERNEL_PATHS:
        return KERNEL_PATHS[KERNEL]
    if CONTROL.exists():
        r = run_cli("features", "--json")
        if r.returncode == 0:
            return tuple(json.loads(r.stdout)["data_paths"])
    return ("auto",)


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, incompressible bytes."""
    return random.Random(seed).randbytes(size)


def drop_caches(device: str) -> None:
    """Forget the page cache of ``device`` so that reads go to the daemon."""
    subprocess.run(["blockdev", "--flushbufs", device], check=True, capture_output=True)


# ---- the daemon ---------------------------------------------------------------------


@dataclass
class Served(ServedChild):
    """One ``ublkmig serve`` child and its device (``device``: its path, once started)."""

    device: str = ""

    @property
    def dev_id(self) -> int:
        return int(self.device.removeprefix("/dev/ublkb"))

    def stop(self, how: str = "SIGTERM", timeout: float = STOP_TIMEOUT) -> int:
        """Stop it ("SIGTERM", "SIGINT" or "cli": `ublkmig stop DEVICE`) and check that it
        exits 0 and its device nodes disappear."""
        if self.proc.poll() is None:
            if how == "cli":
                r = run_cli("stop", self.device, timeout=timeout)
                assert r.returncode == 0, f"ublkmig stop failed: {r.stderr}\n{self.describe()}"
            else:
                self.signal(signal.Signals[how])
        rc = self.wait(timeout)
        assert rc == 0, f"the daemon exited {rc} after {how}:\n{self.describe()}"
        assert "Traceback" not in self.stderr(), self.describe()
        wait_gone(self.device)
        return rc


def wait_gone(device: str, timeout: float = 10.0) -> None:
    """Assert that /dev/ublkbN and /dev/ublkcN are gone (within ``timeout``)."""
    char = device.replace("ublkb", "ublkc")
    deadline = time.monotonic() + timeout
    while os.path.exists(device) or os.path.exists(char):
        if time.monotonic() > deadline:
            raise AssertionError(f"{device} or {char} still exists after the daemon exited")
        time.sleep(0.05)


def start_serve(image: Path, *opts: str, logdir: Path,
                timeout: float = SERVE_TIMEOUT) -> Served:
    """Start ``ublkmig serve IMAGE OPTS...`` and wait for its first stdout line: the
    device's path."""
    s = Served.start([*UBLKMIG, "serve", str(image), *opts], image=image, logdir=logdir)
    s.device = s.first_line(timeout).strip()
    if not s.device.startswith("/dev/ublkb") or not s.device[len("/dev/ublkb"):].isdigit():
        s.signal(signal.SIGKILL)
        raise ServeFailed(f"serve's first line is not a device path: {s.device!r}\n"
                          f"{s.describe()}")
    # the contract: printed once the device accepts I/O, so the node is there
    assert Path(s.device).is_block_device(), f"{s.device} is not a block device yet"
    return s


class ServeFactory:
    """``serve(image, *opts)`` -> Served; every daemon still running at teardown is stopped
    with SIGTERM and must exit 0 with its device gone."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[Served] = []

    def __call__(self, image: Path, *opts: str, timeout: float = SERVE_TIMEOUT) -> Served:
        s = start_serve(image, *opts, logdir=self.logdir, timeout=timeout)
        self.started.append(s)
        return s

    def teardown(self) -> None:
        problems = []
        for s in self.started:
            if s.proc.poll() is None:
                try:
                    s.stop("SIGTERM")
                except AssertionError as e:
                    problems.append(str(e))
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.kill()
                    s.proc.wait()
        if problems:
            raise AssertionError("\n".join(problems))


# ---- fio ---------------------------------------------------------------------------------


class FioFailed(AssertionError):
    pass


def run_fio(filename: str, *, cwd: Path, name: str = "job", timeout: float = 300.0,
            check: bool = True, **options: Any) -> dict[str, Any]:
    """Run one fio job on ``filename`` and return its JSON report.

    Options map to ``--key=value`` (True -> ``--key``; False/None dropped).
    With ``check``, a non-zero exit or a job error raises FioFailed with the
    whole output.
    """
    report = cwd / f"fio-{name}-{time.monotonic_ns()}.json"
    argv = ["fio", f"--name={name}", f"--filename={filename}", "--output-format=json",
            f"--output={report}", "--verify_state_save=0"]
    for k, v in options.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not False and v is not None:
            argv.append(f"--{k}={v}")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise FioFailed(f"fio did not finish within {timeout:.0f} s: {' '.join(argv)}\n"
                        f"{e.stdout!r}\n{e.stderr!r}") from None
    text = report.read_text(errors="replace") if report.exists() else ""
    try:
        data = json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError:
        data = {}
    errors = [(j.get("jobname"), j.get("error")) for j in data.get("jobs", []) if j.get("error")]
    if check and (r.returncode != 0 or not data or errors):
        raise FioFailed(f"fio failed (rc {r.returncode}, job errors {errors}): {' '.join(argv)}\n"
                        f"--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}\n--- report:\n{text}")
    data["_returncode"] = r.returncode
    data["_stderr"] = r.stderr
    return data




def device_info(device: str) -> dict[str, Any]:
    """The served device's entry of ``ublkmig list --json`` (AssertionError if absent)."""
    r = run_cli("list", "--json")
    assert r.returncode == 0, f"ublkmig list --json failed: {r.stderr}"
    for d in json.loads(r.stdout):
        if d.get("path") == device:
            return dict(d)
    raise AssertionError(f"{device} is not in `ublkmig list --json`: {r.stdout}")


def write_device(device: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` with O_DIRECT and fsync (offset, length: 4 KiB aligned)."""
    buf = mmap.mmap(-1, len(data))  # page aligned, as O_DIRECT wants
    buf.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        done = 0
        while done < len(data):
            done += os.pwritev(fd, [memoryview(buf)[done:]], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def read_device(device: str, offset: int, length: int) -> bytes:
    """Read with O_DIRECT (the daemon answers, not the page cache)."""
    buf = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
            if n == 0:
                raise AssertionError(f"short read of {device} at {offset + done}")
            done += n
        return bytes(buf[:length])
    finally:
        os.close(fd)
        buf.close()


# ---- migration -----------------------------------------------------------------------------

MIGRATE_TIMEOUT = 300.0  # `migrate --wait` of a small image under emulation


MODES = ("mirror", "dbt", "snapshot")


def run_ok(*argv: str, timeout: float = 300.0) -> str:
    """Run a command; AssertionError with its output unless it exits 0.  Returns stdout."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(argv)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def start_migrate(device: str, dest: Path | str, *args: str) -> subprocess.Popen[str]:
    """``ublkmig migrate DEVICE --to DEST ARGS --wait`` in the background."""
    return subprocess.Popen([*UBLKMIG, "migrate", device, "--to", str(dest), *args, "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def wait_migrate(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a ``migrate --wait`` started by start_migrate (AssertionError if it hangs)."""
    try:
        out, err = proc.communicate(timeout=MIGRATE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"migrate --wait did not end in {MIGRATE_TIMEOUT:.0f} s:\n"
                             f"{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finish_migrate(proc: subprocess.Popen[str], expect: str = "completed:") -> str:
    """Wait for a ``migrate --wait``; AssertionError unless it exited 0 saying ``expect``
    (``in sync:`` with --no-cutover).  Its stdout."""
    r = wait_migrate(proc)
    assert r.returncode == 0, f"migrate failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert expect in r.stdout, r.stdout
    return r.stdout


def check_completed(device: str, dest: Path | str, mode: str,
                    lost_connections: bool = False) -> dict[str, Any]:  # fmt: skip
    """The migration completed cleanly (with ``lost_connections``: destination errors were
    seen, from connections lost and dialled again)."""
    st = cli_status(device)
    mig = st["migration"]
    assert mig["phase"] == "completed", mig
    assert mig["mode"] == mode and mig["dest"] == str(dest), mig
    assert mig["error"] is None, mig
    assert lost_connections or mig["dest_errors"] == 0, mig
    assert st["image"] == str(dest), f"the device serves {st['image']}, not {dest}"
    assert st["stats"]["errors"] == 0, st["stats"]
    # no mode pauses the guest to cut over (auto ends mirroring, dbt and snapshot's tails
    # mirror), unless --verify asked for it
    assert mig["cutover_stall_ms"] is not None, mig
    assert (mig["final_pause_ms"] is None) is (not mig["verify"]), mig
    return dict(mig)




def cli_status(device: str) -> dict[str, Any]:
    """``ublkmig status DEVICE --json``, run as a user runs it."""
    r = run_cli("status", device, "--json")
    assert r.returncode == 0, f"ublkmig status {device} --json failed: {r.stderr}"
    return dict(json.loads(r.stdout))


def device_status(device: str) -> dict[str, Any]:
    """The daemon's status over its socket (a CLI process costs seconds under emulation)."""
    return Client(device, timeout=30.0).status()


def migration_status(device: str) -> dict[str, Any]:
    mig = Client(device, timeout=30.0).migration()
    assert mig is not None, f"{device} has no migration"
    return mig


def wait_migration(device: str, until: Callable[[dict[str, Any]], bool], *,
                   timeout: float = MIGRATE_TIMEOUT, what: str = "") -> dict[str, Any]:
    """Poll the migration's status until ``until(status)`` holds (AssertionError if it ends
    or the time runs out first); no migration yet counts as not holding."""
    try:
        mig = Client(device, timeout=30.0).wait_migration(until, interval=0.1, timeout=timeout,
                                                          before_start=True)  # fmt: skip
    except WaitTimeout as e:
        raise AssertionError(f"not {what} within {timeout:.0f} s: {e.last}") from None
    if not until(mig):
        raise AssertionError(f"the migration ended before {what or 'the condition held'}: {mig}")
    return mig


def sha256_of(path: str | Path, length: int | None = None) -> str:
    """sha256 of the first ``length`` bytes (default: all) of a file or block device; a block
    device's page cache is dropped first."""
    path = str(path)
    if Path(path).is_block_device():
        drop_caches(path)
    h = hashlib.sha256()
    left = length if length is not None else -1
    with open(path, "rb", buffering=0) as f:
        while left != 0:
            block = f.read(4 << 20 if left < 0 else min(4 << 20, left))
            if not block:
                break
            h.update(block)
            if left > 0:
                left -= len(block)
    return h.hexdigest()


def assert_same_bytes(a: str | Path, b: str | Path, length: int, *, unit: int = 1 << 20) -> str:
    """The first ``length`` bytes of ``a`` and ``b`` (files or block devices) are equal; if
    not, name the first differing ``unit``-sized blocks (the migration's chunks, by default).
    Returns their sha256."""
    a, b = str(a), str(b)
    for p in (a, b):
        if Path(p).is_block_device():
            drop_caches(p)
    bad: list[str] = []
    n_bad = 0
    h = hashlib.sha256()
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        off = 0
        while off < length:
            n = min(unit, length - off)
            x, y = _read_full(fa, n), _read_full(fb, n)
            h.update(x)
            if x != y:
                n_bad += 1
                if len(bad) < 8:
                    first = next((i for i in range(min(len(x), len(y)))
                                  if x[i] != y[i]), min(len(x), len(y)))
                    bad.append(f"block {off // unit} (first difference at byte {off + first}"
                               f"{', ' + a + ' zero' if not any(x) else ''}"
                               f"{', ' + b + ' zero' if not any(y) else ''})")
            off += n
    assert n_bad == 0, (f"{a} and {b} differ in {n_bad} of {-(-length // unit)} blocks of "
                        f"{unit} bytes: {'; '.join(bad)}")
    return h.hexdigest()


def _read_full(f: Any, n: int) -> bytes:
    parts = []
    while n > 0:
        block = f.read(n)
        if not block:
            break
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


class FioLoop(threading.Thread):
    """Guest writes in the background: fio jobs, one after another, each writing every block
    of ``[offset, offset + length)`` once at random (two jobs, one per half, so both vCPUs
    and queues see I/O; 4k-128k at depth 16, direct, crc32c) and verifying what it wrote,
    interleaved (verify_backlog) and at the end.  Every job uses a new seed, so after the
    loop stopped ``verify()`` checks the whole range against the last job.

    ``mark()`` then ``stop()``: stop after the first job that started after the mark
    (writes before, during and after whatever happened in between)."""

    def __init__(self, device: str, offset: int, length: int, *, cwd: Path, seed: int = 1000,
                 max_seconds: float = 600.0, **extra: Any) -> None:
        super().__init__(daemon=True, name=f"fio-loop-{device}")
        self.device = device
        self.cwd = cwd
        self.offset, self.length = offset, length
        self.seed = seed
        self.extra = extra
        self.max_seconds = max_seconds
        self.runs = 0  # jobs finished
        self.started_runs = 0
        self.last_seed: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._marked_at: int | None = None
        self._cond = threading.Condition()

    def job(self, seed: int) -> dict[str, Any]:
        half = self.length // 2
        return dict(name=f"loop{seed}", rw="randwrite", bsrange="4k-128k", blockalign="4k",
                    iodepth=16, ioengine="io_uring", direct=1, verify="crc32c",
                    verify_fatal=1, verify_backlog=64, numjobs=2, offset=self.offset,
                    size=half, offset_increment=half, randseed=seed, group_reporting=False,
                    **self.extra)

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self._halt.is_set():
                if time.monotonic() - t0 > self.max_seconds:
                    raise AssertionError(f"the fio loop ran for {self.max_seconds:.0f} s")
                if not Path(self.device).is_block_device():  # fio would create a file
                    raise AssertionError(f"{self.device} is gone: the fio loop stops")
                seed = self.seed + self.started_runs
                with self._cond:
                    self.started_runs += 1
                    my_run = self.started_runs
                report = run_fio(self.device, cwd=self.cwd, **self.job(seed))
                self.written += sum(j["write"]["io_bytes"] for j in report["jobs"])
                with self._cond:
                    self.runs += 1
                    self.last_seed = seed
                    if self._marked_at is not None and my_run > self._marked_at:
                        self._halt.set()
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e
            with self._cond:
                self._cond.notify_all()

    def wait_runs(self, n: int = 1, timeout: float = 300.0) -> None:
        """Wait until ``n`` jobs have finished."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.runs >= n or self.error is not None
                                     or not self.is_alive(), timeout)
        self.check()
        assert ok, f"the fio loop finished {self.runs} jobs in {timeout:.0f} s, not {n}"

    def mark(self) -> None:
        with self._cond:
            self._marked_at = self.started_runs

    def stop(self, timeout: float = 300.0) -> None:
        """Stop after the job that started after mark() (or now, if not marked) and
        re-raise the loop's failure, if any."""
        with self._cond:
            if self._marked_at is None:
                self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), f"the fio loop did not stop within {timeout:.0f} s"
        self.check()
        assert self.runs > 0 and self.last_seed is not None, "the fio loop finished no job"

    def halt(self, timeout: float = 300.0) -> None:
        """Stop after the current job, whatever happens (fixture teardown)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def verify(self) -> None:
        """Verify the whole range against the last finished job (fio verify_only)."""
        assert self.last_seed is not None
        job = self.job(self.last_seed)
        job["name"] = f"verify{self.last_seed}"
        report = run_fio(self.device, cwd=self.cwd, verify_only=1, **job)
        read = sum(j["read"]["io_bytes"] for j in report["jobs"])
        assert read >= self.length, f"fio verified {read} bytes of {self.length}"


class WriteProbe(threading.Thread):
    """The guest's write latency over time: a 4 KiB O_DIRECT write of ``offset`` every
    ``interval`` seconds, each timed.  ``median(t0, t1)``: of the writes started in
    [t0, t1) (time.monotonic())."""

    def __init__(self, device: str, offset: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True, name=f"write-probe-{device}")
        self.device, self.offset, self.interval = device, offset, interval
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"probe" * 819 + b"!")
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
            try:
                while not self._halt.wait(self.interval):
                    t = time.monotonic()
                    os.pwritev(fd, [buf], self.offset)
                    self.samples.append((t, time.monotonic() - t))
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
        if self.error is not None:
            raise self.error

    def median(self, t0: float, t1: float) -> float:
        lats = sorted(lat for t, lat in self.samples if t0 <= t < t1)
        assert lats, f"no probe write in [{t0:.1f}, {t1:.1f})"
        return lats[len(lats) // 2]


class Steps:
    """Prints how long each step of a test took (``pytest -s`` shows it): ``t("fio")``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = self.last = time.monotonic()

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        print(f"[{self.name}] {step}: {now - self.last:.1f} s (at {now - self.t0:.1f} s)",
              flush=True)
        self.last = now
