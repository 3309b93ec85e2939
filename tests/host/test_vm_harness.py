"""ublkmig.vm without booting anything: a fake vng runs the guest script right here.

The fake takes vng's arguments, records them, and (depending on FAKE_VNG_MODE)
runs the --exec script with sh, hangs silently, or exits at once as a VM that
failed to boot would; like the real vng it always exits 255.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ublkmig import vm

FAKE_VNG = textwrap.dedent("""\
    #!{python}
    import json, os, subprocess, sys, time
    args = sys.argv[1:]
    log = os.environ["FAKE_VNG_LOG"]
    with open(log, "a") as f:
        f.write(json.dumps(args) + "\\n")
    mode = os.environ.get("FAKE_VNG_MODE", "run")
    calls = sum(1 for _ in open(log))
    if mode == "noboot":
        print("Kernel panic - not syncing: VFS: Unable to mount root fs", flush=True)
        sys.exit(255)
    if mode == "hang" or (mode == "hang-once" and calls == 1):
        print("booting...", flush=True)
        time.sleep(3600)
    print("console line", flush=True)
    subprocess.run(["sh", args[args.index("--exec") + 1]])
    sys.exit(255)
""")


@pytest.fixture
def fake_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with a fake kernel, a fake vng, a private VM lock; returns the call log."""
    release = os.uname().release
    kdir = tmp_path / "cache" / "kernels" / "unstable"
    kdir.mkdir(parents=True)
    (kdir / "vmlinuz").write_bytes(b"not a kernel")
    (kdir / "release").write_text(release + "\n")
    mods = tmp_path / "modules"
    (mods / release).mkdir(parents=True)
    (mods / release / "modules.dep").touch()
    vng = tmp_path / "bin" / "vng"
    vng.parent.mkdir()
    vng.write_text(FAKE_VNG.format(python=sys.executable))
    vng.chmod(0o755)
    log = tmp_path / "vng.log"
    monkeypatch.setenv("UBLKMIG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UBLKMIG_VNG", str(vng))
    monkeypatch.setenv("FAKE_VNG_LOG", str(log))
    monkeypatch.setattr(vm, "MODULES_ROOT", mods)
    monkeypatch.setattr(vm, "LOCK_PATH", tmp_path / "vm.lock")
    return log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_status_output_release_env_and_cwd(fake_vm: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    script = 'echo "out $PWD $UBLKMIG_IN_VM $FOO"; echo err >&2; exit 7'
    res = vm.run_in_vm(["sh", "-c", script], env={"FOO": "a b"})
    assert res.returncode == 7
    assert f"out {vm.REPO} 1 a b" in res.output and "err" in res.output
    assert res.kernel_release == os.uname().release
    assert f"out {vm.REPO}" in capsys.readouterr().out  # streamed
    [args] = _calls(fake_vm)
    assert args[:2] == ["--run", str(vm.kernel_path("unstable"))]
    for flag in ("--disable-kvm", "--force-9p", "--exec"):
        assert flag in args
    assert args[args.index("--cpus") + 1] == "2" and args[args.index("--memory") + 1] == "2G"
    rwdir = Path(args[args.index("--rwdir") + 1])
    assert rwdir.parent == Path("/tmp") and not rwdir.exists()  # a fresh folder, removed


def test_no_stream(fake_vm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = vm.run_in_vm(["echo", "quiet"], stream=False)
    assert res.returncode == 0 and "quiet" in res.output
    assert "quiet" not in capsys.readouterr().out


def test_output_is_relayed_while_the_command_runs(fake_vm: Path) -> None:
    """The host prints the first line long before the command ends."""
    code = textwrap.dedent(f"""\
        from pathlib import Path
        from ublkmig import vm
        vm.MODULES_ROOT = Path({str(vm.MODULES_ROOT)!r})
        vm.LOCK_PATH = Path({str(vm.LOCK_PATH)!r})
        vm.run_in_vm(["sh", "-c", "echo first; sleep 3; echo second"])
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, cwd=vm.REPO)
    assert p.stdout is not None
    first = p.stdout.readline()
    while first.startswith(b"ublkmig-vm:"):  # the guest script's notes (no ublk here...)
        first = p.stdout.readline()
    t_first = time.monotonic()
    rest = p.stdout.read()
    assert p.wait(30) == 0
    assert first == b"first\n" and b"second" in rest
    assert time.monotonic() - t_first >= 2.0, "the first line came only at the end"


def _pins() -> dict[int, bool]:
    """The SQARRAY_PIN processes running here: pid -> whether it holds an io_uring."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or "io_uring_params" not in (
                    proc / "cmdline").read_text():
                continue
            fds = [os.readlink(f) for f in (proc / "fd").iterdir()]
        except OSError:
            continue
        found[int(proc.name)] = "anon_inode:[io_uring]" in fds
    return found


def test_the_guest_pins_the_sq_array_key_while_the_command_runs(fake_vm: Path) -> None:
    """A process holds an io_uring with an SQ array for the whole command (see
    vm.SQARRAY_PIN: without it the kernel patches io_submit_sqes as tests come and go,
    which TCG can turn into an "Oops: int3"), and is gone after it."""
    before = set(_pins())
    check = ("import time, sys; sys.path.insert(0, 'tests/host'); "
             "from test_vm_harness import _pins\n"
             "for _ in range(100):\n"
             f"    if any(v for p, v in _pins().items() if p not in {before!r}): sys.exit(0)\n"
             "    time.sleep(0.1)\n"
             "sys.exit(3)\n")
    res = vm.run_in_vm([sys.executable, "-c", check], stream=False)
    assert res.returncode == 0, res.output
    deadline = time.monotonic() + 5
    while set(_pins()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_pins()) - before


def test_a_vm_that_does_not_boot_is_an_error(fake_vm: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """...is booted again (it never started the command), then given up on."""
    monkeypatch.setenv("FAKE_VNG_MODE", "noboot")
    with pytest.raises(vm.VmError, match="during boot") as e:
        vm.run_in_vm(["true"])
    assert "Kernel panic" in str(e.value)  # the console's tail is in the message
    assert len(_calls(fake_vm)) == vm.BOOT_ATTEMPTS


def test_a_vm_that_dies_after_the_command_started_is_not_retried(
        fake_vm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(vm.VmError, match="without reporting the command's exit status"):
        # the fake "guest" dies in the middle of the command: no status is written
        vm.run_in_vm(["sh", "-c", "echo started; kill -9 $PPID"])
    assert len(_calls(fake_vm)) == 1


def test_timeout_kills_the_vm(fake_vm: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(vm.VmError, match="did not finish within"):
        vm.run_in_vm(["sh", "-c", f"echo $$ >{pidfile}; exec sleep 60"], timeout=3)
    assert time.monotonic() - t0 < 30
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_stalled_boot_is_retried(fake_vm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "hang-once")
    monkeypatch.setattr(vm, "BOOT_STALL", 1.5)
    res = vm.run_in_vm(["echo", "second try"])
    assert res.returncode == 0 and "second try" in res.output
    assert len(_calls(fake_vm)) == 2


def test_a_boot_that_always_stalls_gives_up(fake_vm: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "hang")
    monkeypatch.setattr(vm, "BOOT_STALL", 1.0)
    monkeypatch.setattr(vm, "BOOT_ATTEMPTS", 2)
    with pytest.raises(vm.VmError, match="stalled"):
        vm.run_in_vm(["true"])
    assert len(_calls(fake_vm)) == 2


def test_one_vm_at_a_time(fake_vm: Path) -> None:
    """Another holder of the lock delays the VM; the lock is held while it runs."""
    holder = subprocess.Popen(["flock", str(vm.LOCK_PATH), "sleep", "2"])
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        res = vm.run_in_vm(["sh", "-c", f"flock -n {vm.LOCK_PATH} true"], stream=False)
        assert time.monotonic() - t0 >= 1.5
    finally:
        holder.wait()
    assert res.returncode == 1, "the lock was free while the VM ran"


def test_kernel_path_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UBLKMIG_CACHE", str(tmp_path))
    with pytest.raises(vm.VmError, match="run ci/setup"):
        vm.kernel_path("unstable")
    with pytest.raises(vm.VmError, match="unknown kernel"):
        vm.kernel_path("bogus")
    kdir = tmp_path / "kernels" / "lts"
    kdir.mkdir(parents=True)
    (kdir / "vmlinuz").touch()
    (kdir / "release").write_text("0.0.0-nonexistent\n")
    with pytest.raises(vm.VmError, match="modules of kernel 0.0.0-nonexistent.*ci/setup"):
        vm.kernel_path("lts")


def test_vm_error_is_a_user_error() -> None:
    from ublkmig.errors import UserError

    assert issubclass(vm.VmError, UserError)


def test_have_ublk_is_a_bool() -> None:
    assert vm.have_ublk() is Path("/dev/ublk-control").exists()


def test_read_junit(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest" errors="1" failures="2" skipped="2" tests="9">
        <testcase classname="tests.vm.test_a" name="test_x"/>
        <testcase classname="tests.vm.test_a" name="test_s"><skipped type="pytest.skip"
            message="no driver"/></testcase>
        <testcase classname="tests.vm.test_a" name="test_xf"><skipped type="pytest.xfail"
            message="known"/></testcase>
        </testsuite></testsuites>
    """))
    s = vm.read_junit(xml)
    assert (s.tests, s.failures, s.errors, s.skipped, s.passed) == (9, 2, 1, 2, 4)
    assert s.skips == ["tests.vm.test_a::test_s: no driver"]


@pytest.mark.parametrize(
    ("body", "allow_skips", "ok"),
    [
        ("def test_ok():\n    pass\n", False, True),
        ("def test_bad():\n    assert False\n", False, False),
        ("import pytest\ndef test_s():\n    pytest.skip('nope')\n"
         "def test_ok():\n    pass\n", False, False),
        ("import pytest\ndef test_s():\n    pytest.skip('nope')\n"
         "def test_ok():\n    pass\n", True, True),
        ("import pytest\ndef test_s():\n    pytest.skip('nope')\n", True, False),
        ("x = 1\n", False, False),
    ],
    ids=["pass", "fail", "skip", "skip-allowed", "all-skipped", "no-tests"],
)
def test_vm_pytest_verdict(fake_vm: Path, tmp_path: Path, body: str, allow_skips: bool,
                           ok: bool) -> None:
    test = tmp_path / "t" / "test_it.py"
    test.parent.mkdir()
    test.write_text(body)
    got = vm.vm_pytest("unstable", [str(test)], timeout=120, allow_skips=allow_skips,
                       results=tmp_path / "results")
    assert got is ok
    assert (tmp_path / "results" / "unstable" / "output").exists()
