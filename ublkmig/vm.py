"""Run a command inside a kernel VM that has the ublk driver.

The host's kernel has no ublk driver, so real-device tests boot one of the
kernels that ``ci/kernels`` caches (``unstable``: Debian's newest, with zero
copy; ``lts``: 6.12, copy mode only) under QEMU with virtme-ng, sharing the
host's root filesystem read-only over 9p, and run the command there.

How a command gets in and its results get out (see shared KERNEL-VM.md):

- ``vng`` without ``--verbose`` shows nothing of the guest and exits 255
  whatever the guest did.  So a fresh host folder (the *rwdir*) is shared
  writable with the guest; the host writes a small shell script there, the
  guest runs it (``--exec``), and the script writes the command's output,
  the kernel release, the guest's dmesg and finally the exit status into
  that folder.  The host tails the output file while the VM runs, relaying
  it live, and reads the status when the VM has powered off.
- vng's own output (the kernel console, with ``--verbose``) goes to
  ``console.log`` in the rwdir; it is what to read when a VM fails to boot.
- One VM at a time on this machine: an exclusive ``flock`` on
  ``/tmp/ublkmig-vm.lock`` is held for the whole boot (vng inherits it, so
  a VM orphaned by a killed caller still holds it).
- virtme shares the root without caching, which makes every file lookup a
  9p round trip (~5 ms under TCG): a bare ``python -c pass`` took 6-11 s.
  So the host root is exported a second time (tag ``ublkmig_root``) and the
  guest mounts it with ``cache=loose`` and binds the Python trees and the
  repo from it: ``python -c pass`` then takes under 1 s, importing the CLI's
  dependencies about 3 s.
- The guest cannot write byte code into the read-only share, and a Python
  compiling the project's files at every start paid for it each time
  (``ublkmig --help`` took 6.3-8.9 s): the host compiles them before each
  boot (_compile; then 4.1-5.6 s).

Measured here (2 shared host cores, TCG, 2 vCPUs, 2 GiB): launch to command
start 6-9 s on an idle host, up to 14 s when the other cores are busy
(``VmResult.boot_seconds``); a trivial command powers off 1-2 s later.  The
VM tests take about 5-7 minutes per kernel.  Boots fail now and then (about
1 in 20: a hang or an oops while the kernel patches its text under TCG);
those are retried, since the command had not started.

Also a command line, used by ``ci/test``::

    python -m ublkmig.vm run [--kernel unstable] -- CMD [ARG...]
    python -m ublkmig.vm pytest [--kernel unstable|lts|all] [-- PYTEST-ARGS]
"""

from __future__ import annotations

import argparse
import codecs
import compileall
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ublkmig.errors import UserError

REPO = Path(__file__).resolve().parent.parent
KERNELS = ("unstable", "lts")
LOCK_PATH = Path("/tmp/ublkmig-vm.lock")
MODULES_ROOT = Path("/lib/modules")
# where the guest finds programs: this venv first, then the system's
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# files the guest writes into the rwdir
OUTPUT, STATUS, RELEASE, DMESG, CONSOLE, SCRIPT, UBLK = (
    "output", "status", "release", "dmesg", "console.log", "guest.sh", "ublk")
# A boot that prints nothing on the console for BOOT_STALL s, has not started
# the command after BOOT_TIMEOUT s, or dies before starting it, is tried again:
# under TCG (2 vCPUs) boots here occasionally hang or oops while the kernel
# patches its text (seen: a hang at "Switched to clocksource tsc-early", an
# "Oops: int3" in sched_clock_cpu).
BOOT_STALL, BOOT_TIMEOUT, BOOT_ATTEMPTS = 60.0, 240.0, 3
# Under TCG a vCPU can run kernel text another vCPU is patching and die of the patch's
# int3 ("Oops: int3" at io_submit_sqes+0xcc, then a panic: seen twice in the unstable
# suite, in session 13 and in a CI run of session 14).  The text there is the static key
# io_key_has_sqarray, which io_uring turns on with the first ring that has an SQ array
# (fio's, the daemon's) and off a second after the last one closes, so it flips again
# and again as tests start and stop them.  A process holding one such ring for the
# whole run keeps it on: no patching there.  This is the emulator's flaw, not ublk's.
# (It dies with the guest script: PR_SET_PDEATHSIG, argv[1] the script's pid.)
SQARRAY_PIN = ("import ctypes, os, signal, sys\n"
               "libc = ctypes.CDLL(None, use_errno=True)\n"
               "libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
               "if os.getppid() != int(sys.argv[1]):\n"
               "    sys.exit(0)\n"
               "params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed\n"
               "if libc.syscall(425, 1, params) < 0:  # io_uring_setup\n"
               "    sys.exit('ublkmig-vm: io_uring_setup failed: errno %d' % ctypes.get_errno())\n"
               "signal.pause()\n")
# a second, cached 9p export of the host root (see _cached_binds)
CACHED_TAG, CACHED_MNT = "ublkmig_root", "/run/ublkmig-root"
QEMU_CACHED_ROOT = (
    "-fsdev local,id=ublkmig_root,path=/,security_model=none,readonly=on,multidevs=remap"
    f" -device virtio-9p-pci,fsdev=ublkmig_root,mount_tag={CACHED_TAG}")

class VmError(UserError):
    """The VM could not be set up, booted, or did not report a result (one line for the
    CLI's error report, plus the console's tail when a boot failed)."""


@dataclass
class VmResult:
    returncode: int          # the guest command's exit status
    output: str              # its stdout and stderr, interleaved
    kernel_release: str      # uname -r inside the guest
    ublk: bool = False       # /dev/ublk-control existed after modprobe ublk_drv
    boot_seconds: float = 0.0   # vng start -> the command starts in the guest
    total_seconds: float = 0.0  # vng start -> VM powered off
    # output, dmesg, console.log, guest.sh in the rwdir (kept only if the caller gave it)
    files: dict[str, Path] = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.environ.get("UBLKMIG_CACHE") or REPO / ".cache")


def kernel_path(name: str) -> Path:
    """The cached vmlinuz of kernel ``name`` ("unstable" or "lts")."""
    if name not in KERNELS:
        raise VmError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}")
    kdir = cache_dir() / "kernels" / name
    vmlinuz, release = kdir / "vmlinuz", kdir / "release"
    if not vmlinuz.is_file() or not release.is_file():
        raise VmError(f"kernel {name!r} is not in {kdir}: run ci/setup (as root) to fetch it")
    rel = release.read_text().strip()
    if not (MODULES_ROOT / rel / "modules.dep").is_file():
        raise VmError(f"the modules of kernel {rel} are not in {MODULES_ROOT / rel}: "
                      "run ci/setup (as root) to install them")
    return vmlinuz


def find_vng() -> Path:
    """vng of this venv (beside sys.executable), else the one on PATH."""
    override = os.environ.get("UBLKMIG_VNG")
    if override:
        return Path(override)
    local = Path(sys.executable).parent / "vng"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("vng")
    if found:
        return Path(found)
    raise VmError("vng (virtme-ng) is not installed: run ci/setup, or pip install virtme-ng")


def have_ublk() -> bool:
    """True if this machine's kernel offers ublk (loading ublk_drv if needed)."""
    if Path("/dev/ublk-control").exists():
        return True
    try:
        r = subprocess.run(["modprobe", "-q", "ublk_drv"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0:
        return False
    for _ in range(20):  # the misc device node appears right after the load
        if Path("/dev/ublk-control").exists():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def vm_lock(what: str = "") -> Iterator[int]:
    """Hold the machine-wide VM lock (blocking, with a note while waiting).

    Yields the locked fd: pass it on to the VM's processes (``pass_fds``) so
    that a VM orphaned by a killed parent still holds the lock until it ends.
    """
    try:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(LOCK_PATH, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(LOCK_PATH).read_text(errors="replace").strip() or "?"
            _note(f"waiting for another VM to finish (lock {LOCK_PATH}: {holder})")
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            _note(f"got the VM lock after {time.monotonic() - t0:.0f} s")
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')} {what}\n"
                      .encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock unless a VM process still holds it


class _Terminated(BaseException):
    """SIGTERM/SIGHUP while a VM runs: unwind so that the VM gets killed."""


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise _Terminated(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _note(msg: str) -> None:
    print(f"ublkmig.vm: {msg}", file=sys.stderr, flush=True)


def _guest_script(argv: Sequence[str], rwdir: Path, env: dict[str, str], cwd: Path) -> str:
    q = shlex.quote
    path = f"{Path(sys.executable).parent}:{GUEST_PATH}"
    exports = {"PATH": path, "HOME": "/tmp", "UBLKMIG_IN_VM": "1",
               "UBLKMIG_VM_RWDIR": str(rwdir), "PYTHONUNBUFFERED": "1",
               # the guest's /var/lib is the host's, read-only: superseded-image marks go to
               # the guest's own tmpfs (a test deleting /run still finds them)
               "UBLKMIG_STATE_DIR": "/tmp/ublkmig-state",
               "PYTHONDONTWRITEBYTECODE": "1", **env}
    lines = [
        "#!/bin/sh",
        "# written by ublkmig.vm; runs inside the kernel VM",
        f"rw={q(str(rwdir))}",
        'uname -r >"$rw/release"',
        *(f"export {k}={q(v)}" for k, v in exports.items()),
        "{",
        *_cached_binds(cwd, rwdir),
        '  if ! modprobe ublk_drv 2>"$rw/modprobe.err"; then',
        '    echo "ublkmig-vm: modprobe ublk_drv failed on $(uname -r):'
        ' $(cat "$rw/modprobe.err")" >&2',
        "  elif [ ! -e /dev/ublk-control ]; then",
        "    echo 'ublkmig-vm: ublk_drv is loaded but /dev/ublk-control is missing' >&2",
        "  fi",
        '  if [ -e /dev/ublk-control ]; then echo yes >"$rw/ublk"; else echo no >"$rw/ublk"; fi',
        f"  {q(sys.executable)} -c {q(SQARRAY_PIN)} $$ &",
        "  pin=$!",
        f"  cd {q(str(cwd))} && {shlex.join(argv)}",
        '} >"$rw/output" 2>&1 </dev/null',
        'echo $? >"$rw/status.tmp"',
        'kill "$pin" 2>/dev/null',
        'dmesg >"$rw/dmesg" 2>&1',
        'mv "$rw/status.tmp" "$rw/status"',
        "sync",
        "",
    ]
    return "\n".join(lines)


def _cached_binds(cwd: Path, rwdir: Path) -> list[str]:
    """Guest shell lines: mount the host root a second time with cache=loose (tag
    CACHED_TAG) and bind the Python trees and the repo from it over the originals.

    virtme mounts the root without caching, so every stat is a 9p round trip
    (about 5 ms under TCG) and a Python start costs 6-11 s; with the cached
    binds it costs under 1 s.  The shared root is read-only, so the cache
    cannot go stale within a run (unless the host edits files meanwhile).
    """
    trees: list[Path] = []
    for t in sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
                     REPO.resolve(), cwd.resolve()}, key=lambda p: len(p.parts)):
        if rwdir.is_relative_to(t):  # a bind over it would hide the rwdir
            continue
        if t != Path("/") and not any(t.is_relative_to(u) for u in trees):
            trees.append(t)
    q = shlex.quote
    # only where the tag exists: never mount anything over a host's folders
    lines = [f"  if grep -qs {CACHED_TAG} /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag &&",
             f"     mkdir -p {CACHED_MNT} && mount -t 9p -o ro,trans=virtio,version=9p2000.L,"
             f"access=any,msize=524288,cache=loose {CACHED_TAG} {CACHED_MNT}; then"]
    lines += [f"    mount --bind {q(f'{CACHED_MNT}{t}')} {q(str(t))} ||"
              f" echo 'ublkmig-vm: cannot bind the cached {t}' >&2" for t in trees]
    lines += ["  else", "    echo 'ublkmig-vm: no cached root (slow 9p lookups)' >&2", "  fi"]
    return lines


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(none)"
    return "\n".join(lines[-n:]) or "(empty)"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_in_vm(argv: list[str], kernel: str = "unstable", *, memory: str = "2G", cpus: int = 2,
              timeout: float = 1800, env: dict[str, str] | None = None, stream: bool = True,
              rwdir: Path | None = None, cwd: Path = REPO) -> VmResult:
    """Boot ``kernel`` in a VM, run ``argv`` there (cwd: the repo root) and power off.

    Returns the command's exit status and output; raises VmError when the VM
    cannot boot or does not report an exit status within ``timeout`` seconds
    (the VM is then killed).  ``env`` is exported to the command, which also
    sees UBLKMIG_IN_VM=1 and UBLKMIG_VM_RWDIR (a host folder it may write
    results to).  With ``stream``, the command's output is relayed to stdout
    as it is produced.  ``rwdir``: use this (existing, empty) folder instead
    of a temporary one, and keep it afterwards.
    """
    if not argv:
        raise VmError("no command to run in the VM")
    vmlinuz = kernel_path(kernel)
    vng = find_vng()
    own_dir = rwdir is None
    rw = Path(tempfile.mkdtemp(prefix="ublkmig-vm-", dir="/tmp")) if own_dir else Path(rwdir)
    rw = rw.resolve()
    try:
        return _run(argv, kernel, vmlinuz, vng, rw, memory=memory, cpus=cpus, timeout=timeout,
                    env=env or {}, stream=stream, cwd=cwd)
    finally:
        if own_dir:
            shutil.rmtree(rw, ignore_errors=True)


class _BootStalled(Exception):
    """The VM hung or died before the command started: safe to boot again."""


def _crash_line(console: Path) -> str:
    """The kernel's first oops/panic line in a console log, if any."""
    with contextlib.suppress(OSError):
        for line in console.read_text(errors="replace").splitlines():
            if any(w in line for w in ("Oops", "Kernel panic", "BUG:", "general protection")):
                return line.strip()
    return ""


def _compile(cwd: Path) -> None:
    """Byte-compile the project's Python files (the package and the tests, of the repo and of
    ``cwd``) on the host, where __pycache__ is writable: the guest reads them from the share
    instead of compiling every file it imports in every process."""
    for tree in sorted({REPO, cwd.resolve()}):
        for sub in ("ublkmig", "tests"):
            if (tree / sub).is_dir():
                compileall.compile_dir(tree / sub, quiet=2, workers=0)


def _run(argv: Sequence[str], kernel: str, vmlinuz: Path, vng: Path, rw: Path, *, memory: str,
         cpus: int, timeout: float, env: dict[str, str], stream: bool, cwd: Path) -> VmResult:
    _compile(cwd)
    script = rw / SCRIPT
    script.write_text(_guest_script(argv, rw, env, cwd))
    script.chmod(0o755)
    cmd = [str(vng), "--run", str(vmlinuz), "--disable-kvm", "--force-9p",
           "--cpus", str(cpus), "--memory", memory, "--rwdir", str(rw), "--cwd", str(cwd),
           f"--qemu-opts={QEMU_CACHED_ROOT}", "--verbose", "--exec", str(script)]
    with vm_lock(f"{kernel}: {shlex.join(argv)[:200]}") as lockfd, _terminate_unwinds():
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return _boot(cmd, kernel, rw, lockfd, timeout=timeout, stream=stream)
            except _BootStalled as e:
                crash = _crash_line(rw / CONSOLE)
                _note(f"{e}{f' ({crash})' if crash else ''}"
                      + ("" if attempt == BOOT_ATTEMPTS else "; booting again"))
                if attempt == BOOT_ATTEMPTS:
                    raise VmError(f"{e} ({BOOT_ATTEMPTS} attempts); console:\n"
                                  f"{_tail(rw / CONSOLE, 40)}") from None
    raise AssertionError("unreachable")


def _boot(cmd: list[str], kernel: str, rw: Path, lockfd: int, *, timeout: float,
          stream: bool) -> VmResult:
    for name in (OUTPUT, STATUS, RELEASE, DMESG, CONSOLE, UBLK, "status.tmp", "modprobe.err"):
        (rw / name).unlink(missing_ok=True)
    (rw / OUTPUT).touch()
    vng = Path(cmd[0])
    # vng runs virtme-run, which it finds on PATH: put vng's folder first
    penv = dict(os.environ, PATH=f"{vng.parent}:{os.environ.get('PATH', GUEST_PATH)}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks: list[bytes] = []
    _note(f"booting {kernel} ({cmd[2]}) under TCG")
    t0 = time.monotonic()
    boot: float | None = None
    console_size, console_seen = -1, t0
    with open(rw / CONSOLE, "wb") as console, open(rw / OUTPUT, "rb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, env=penv, start_new_session=True,
                                pass_fds=(lockfd,))
        try:
            while True:
                done = proc.poll() is not None
                data = out.read()
                if data:
                    chunks.append(data)
                    if stream:
                        sys.stdout.write(decoder.decode(data))
                        sys.stdout.flush()
                now = time.monotonic()
                if boot is None and (rw / RELEASE).exists():
                    boot = now - t0
                    _note(f"{kernel} booted in {boot:.1f} s")
                if done:
                    break
                if boot is None:  # watch for a boot that hangs (seen under TCG)
                    size = (rw / CONSOLE).stat().st_size
                    if size != console_size:
                        console_size, console_seen = size, now
                    if now - console_seen > BOOT_STALL or now - t0 > BOOT_TIMEOUT:
                        _kill_group(proc)
                        raise _BootStalled(
                            f"the {kernel} VM's boot stalled (no console output for"
                            f" {now - console_seen:.0f} s, {now - t0:.0f} s since launch)")
                if now - t0 > timeout:
                    _kill_group(proc)
                    raise VmError(
                        f"the VM ({kernel}) did not finish within {timeout:.0f} s and was"
                        f" killed; last output:\n{_tail(rw / OUTPUT, 30)}\n"
                        f"console:\n{_tail(rw / CONSOLE, 30)}")
                time.sleep(0.2)
        except BaseException:
            _kill_group(proc)
            raise
    if stream:
        tail = decoder.decode(b"", final=True)
        if tail:
            sys.stdout.write(tail)
        sys.stdout.flush()
    total = time.monotonic() - t0
    output = b"".join(chunks).decode(errors="replace")
    status = rw / STATUS
    if boot is None and not (rw / RELEASE).exists():
        raise _BootStalled(f"the {kernel} VM exited during boot (vng status {proc.returncode},"
                           f" {total:.0f} s), before the command started")
    if not status.exists():
        raise VmError(
            f"the VM ({kernel}) exited (vng status {proc.returncode}) after {total:.0f} s"
            f" without reporting the command's exit status: it did not boot, or the guest"
            f" crashed.\nlast output:\n{_tail(rw / OUTPUT, 30)}\n"
            f"console ({rw / CONSOLE}):\n{_tail(rw / CONSOLE, 40)}")
    rc = int(status.read_text().strip() or "255")
    release = (rw / RELEASE).read_text().strip() if (rw / RELEASE).exists() else ""
    ublk = (rw / UBLK).exists() and (rw / UBLK).read_text().strip() == "yes"
    _note(f"{kernel} ({release}): command exited {rc}; VM ran {total:.1f} s"
          f" (boot {boot or 0:.1f} s)")
    files = {n: rw / n for n in (OUTPUT, DMESG, CONSOLE, SCRIPT) if (rw / n).exists()}
    return VmResult(rc, output, release, ublk, boot or 0.0, total, files)


# ---- pytest inside the VM (ci/test) -------------------------------------

@dataclass
class JunitSummary:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    skips: list[str] = field(default_factory=list)  # "test id: reason"

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read_junit(path: Path) -> JunitSummary:
    s = JunitSummary()
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for suite in suites:
        s.tests += int(suite.get("tests", 0))
        s.failures += int(suite.get("failures", 0))
        s.errors += int(suite.get("errors", 0))
        s.skipped += int(suite.get("skipped", 0))
        for case in suite.iter("testcase"):
            sk = case.find("skipped")
            if sk is not None and sk.get("type") != "pytest.xfail":
                cid = f"{case.get('classname', '')}::{case.get('name', '')}"
                s.skips.append(f"{cid}: {sk.get('message', '')}")
    return s


def _looks_like_path(arg: str) -> bool:
    return not arg.startswith("-") and (REPO / arg.split("::")[0]).exists()


def vm_pytest(kernel: str, pytest_args: Sequence[str], *, timeout: float, allow_skips: bool,
              results: Path | None) -> bool:
    """Run the VM tests on ``kernel``; True when they all ran and passed."""
    rw = Path(tempfile.mkdtemp(prefix=f"ublkmig-vm-{kernel}-", dir="/tmp"))
    try:
        junit = rw / "junit.xml"
        args = list(pytest_args)
        if not any(_looks_like_path(a) for a in args):
            args.append("tests/vm")
        # faulthandler_timeout: a test stuck for 5 min prints every thread's stack
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                "--durations=25", f"--junitxml={junit}", "-o", "junit_family=xunit2",
                "-o", "faulthandler_timeout=300", *args]
        try:
            res = run_in_vm(argv, kernel, timeout=timeout, rwdir=rw,
                            env={"UBLKMIG_VM_KERNEL": kernel})
        except VmError as e:
            print(f"FAIL vm tests on {kernel}: {e}", file=sys.stderr)
            return False
        finally:
            if results is not None:
                dest = results / kernel
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(rw, dest)
                print(f"vm tests on {kernel}: output, dmesg, console.log, junit.xml in {dest}",
                      file=sys.stderr)
        head = f"vm tests on {kernel} ({res.kernel_release})"
        if not junit.exists():
            print(f"FAIL {head}: pytest exited {res.returncode} and wrote no report",
                  file=sys.stderr)
            return False
        s = read_junit(junit)
        print(f"{head}: {s.passed} passed, {s.failures} failed, {s.errors} errors,"
              f" {s.skipped} skipped in {res.total_seconds:.0f} s"
              f" (boot {res.boot_seconds:.1f} s)", file=sys.stderr)
        ok = res.returncode == 0 and s.failures == 0 and s.errors == 0
        if s.tests == 0 or s.tests == s.skipped:
            print(f"FAIL {head}: no test ran", file=sys.stderr)
            ok = False
        if s.skips:
            for line in s.skips:
                print(f"  skipped: {line}", file=sys.stderr)
            if not allow_skips:
                print(f"FAIL {head}: VM tests must not skip in CI"
                      " (--allow-skips to tolerate)", file=sys.stderr)
                ok = False
        if res.returncode not in (0, 1):  # 1 = some test failed; others = pytest trouble
            print(f"FAIL {head}: pytest exited {res.returncode}", file=sys.stderr)
            ok = False
        return ok
    finally:
        shutil.rmtree(rw, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ublkmig.vm",
                                description="Run commands or the VM tests in a kernel VM.")
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run one command in a VM")
    r.add_argument("--kernel", choices=KERNELS, default="unstable")
    r.add_argument("--memory", default="2G")
    r.add_argument("--cpus", type=int, default=2)
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    t = sub.add_parser("pytest", help="run tests/vm in a VM per kernel")
    t.add_argument("--kernel", choices=(*KERNELS, "all"), default="all")
    t.add_argument("--timeout", type=float, default=1800, help="per kernel, seconds")
    t.add_argument("--allow-skips", action="store_true")
    t.add_argument("--results", type=Path, default=REPO / "results" / "vm",
                   help="copy each run's output, dmesg, console and junit.xml here")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        if a.what == "run":
            cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
            env = dict(e.split("=", 1) for e in a.env)
            res = run_in_vm(cmd, a.kernel, memory=a.memory, cpus=a.cpus, timeout=a.timeout,
                            env=env)
            return res.returncode
        kernels = KERNELS if a.kernel == "all" else (a.kernel,)
        extra = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
        results = {k: vm_pytest(k, extra, timeout=a.timeout, allow_skips=a.allow_skips,
                                results=a.results) for k in kernels}
        for k, ok in results.items():
            print(f"{'ok  ' if ok else 'FAIL'} vm tests on {k}", file=sys.stderr)
        return 0 if all(results.values()) else 1
    except VmError as e:
        print(f"ublkmig.vm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
