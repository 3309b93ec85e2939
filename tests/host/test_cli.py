"""CLI behaviour that needs no ublk driver: bad input is one line on stderr and exit 1 (2 for
usage errors), never a traceback."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import call_main, one_error_line, run_cli
from support.control_fakes import fake_info, serving

from ublkmig import control, daemon

NO_DRIVER = not daemon.CONTROL_DEVICE.exists()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "ok.img").write_bytes(b"\0" * (1 << 20))
    (tmp_path / "empty.img").touch()
    (tmp_path / "odd.img").write_bytes(b"\0" * 1000)
    (tmp_path / "k2.img").write_bytes(b"\0" * 2048)  # multiple of 512, not of 4096
    (tmp_path / "dir").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.img"], "image not found: {d}/missing.img"),
        (["dir"], "image is a directory: {d}/dir"),
        (["empty.img"], "image is empty: {d}/empty.img"),
        (["odd.img"], "image size 1000 bytes is not a multiple of the logical block size 512"),
        (["--logical-block-size", "4096", "k2.img"], "multiple of the logical block size 4096"),
        (["--read-only", "empty.img"], "image is empty"),
        (["/dev/null"], "image is not a regular file or a block device: /dev/null"),
    ],
)  # fmt: skip
def test_serve_bad_image(
    images: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    args = [a if a.startswith(("-", "/")) or a.isdigit() else str(images / a) for a in args]
    rc, out, err = call_main(capsys, "serve", *args)
    assert rc == 1 and out == ""
    assert message.format(d=images) in one_error_line(err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--queues", "0"], "Invalid value for '--queues': 0 is not in the range 1<=x<=64"),
        (["--queues", "65"], "'--queues': 65 is not in the range"),
        (["--queues", "two"], "'--queues': 'two' is not a valid integer"),
        (["--depth", "0"], "'--depth': 0 is not in the range 1<=x<=4096"),
        (["--depth", "4097"], "'--depth': 4097 is not in the range"),
        (["--logical-block-size", "1024"], "'1024' is not one of '512', '4096'"),
        (["--data-path", "fast"], "'fast' is not one of 'auto', 'auto-zc', 'zc', 'copy'"),
        (["--bogus"], "No such option '--bogus'"),
    ],
)
def test_serve_bad_options(
    images: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rc, out, err = call_main(capsys, "serve", *args, str(images / "ok.img"))
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert message in line and "ublkmig serve --help" in line


def test_serve_missing_argument(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = call_main(capsys, "serve")
    assert rc == 2 and "Missing argument 'IMAGE'" in one_error_line(err)


def test_serve_not_root(
    images: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rc, out, err = call_main(capsys, "serve", str(images / "ok.img"))
    assert rc == 1 and out == ""
    assert one_error_line(err) == "must run as root (ublk devices need CAP_SYS_ADMIN)"


@pytest.mark.skipif(not NO_DRIVER, reason="this host has a ublk driver")
def test_serve_without_driver(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call_main(capsys, "serve", str(images / "ok.img"))
    assert rc == 1 and out == ""
    line = one_error_line(err)
    assert "no ublk driver: /dev/ublk-control is missing" in line
    assert "modprobe ublk_drv" in line and "CONFIG_BLK_DEV_UBLK" in line
    assert "Debian trixie's 6.12" in line and "bookworm's 6.1 lacks it" in line


@pytest.mark.skipif(not NO_DRIVER, reason="this host has a ublk driver")
def test_features_without_driver(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call_main(capsys, "features")
    assert rc == 1 and out == ""
    assert "no ublk driver" in one_error_line(err)


@pytest.fixture
def locked(images: Path) -> Iterator[Path]:
    image = images / "ok.img"
    fd = os.open(image, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield image
    os.close(fd)


def test_serve_image_already_served(
    locked: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = fake_info(id=4, path="/dev/ublkb4", image=str(locked), pid=4242)
    with serving(control.socket_path(4), {"info": info}):
        rc, out, err = call_main(capsys, "serve", "--read-only", str(locked))
    assert rc == 1 and out == ""
    assert one_error_line(err) == f"image {locked} is already served by /dev/ublkb4 (pid 4242)"


def test_serve_nbd_export_checks(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An NBD export as the image: its URI is kept as it is (not a path); --direct does not
    apply; another daemon of this host serving it is refused, as for a file."""
    uri = "nbd://127.0.0.1:1/disk"
    rc, out, err = call_main(capsys, "serve", "--direct", uri)
    assert rc == 1 and out == ""
    assert one_error_line(err) == ("--direct applies to a file or a block device, not to the NBD "
                                   f"export {uri}")  # fmt: skip
    info = fake_info(id=4, path="/dev/ublkb4", image=uri, pid=4242)
    with serving(control.socket_path(4), {"info": info}):
        rc, out, err = call_main(capsys, "serve", uri)
    assert rc == 1 and out == ""
    line = one_error_line(err)
    assert line == f"the NBD export {uri} is already served by /dev/ublkb4 (pid 4242)"
    for bad in (["--timeout", "0"], ["--reconnect-wait", "-1"]):
        rc, out, err = call_main(capsys, "serve", *bad, uri)
        assert rc == 2 and "is not in the range 0.1<=x<=3600" in one_error_line(err)


def test_serve_image_locked_by_someone_else(
    locked: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(control.socket_path(4), {"info": fake_info(image="/elsewhere.img")}):
        rc, _, err = call_main(capsys, "serve", str(locked))
    assert rc == 1
    assert f"image {locked} is locked by another process" in one_error_line(err)


def test_stop_without_daemons(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for dev in ("7", "/dev/ublkb7", "ublkb7"):
        rc, out, err = call_main(capsys, "stop", dev)
        assert rc == 1 and out == ""
        assert one_error_line(err) == "no ublkmig daemon serves /dev/ublkb7"


@pytest.mark.parametrize("dev", ["foo", "/dev/sda", "-1", "/dev/ublkc0"])
def test_stop_bad_device(capsys: pytest.CaptureFixture[str], dev: str) -> None:
    rc, _, err = call_main(capsys, "stop", "--", dev)
    assert rc == 2
    assert "is not a ublk device (expected /dev/ublkbN or N)" in one_error_line(err)


def test_stop_asks_the_daemon_and_waits(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    requests: list[str] = []

    async def stop(args: dict[str, object]) -> dict[str, object]:
        requests.append("stop")
        return {"state": "stopping"}

    with serving(control.socket_path(3), {"stop": stop}):
        rc, out, err = call_main(capsys, "stop", "--no-wait", "/dev/ublkb3")
        assert (rc, out, err) == (0, "stopping /dev/ublkb3\n", "")
        rc, out, err = call_main(capsys, "stop", "--timeout", "0.2", "3")
        assert rc == 1
        assert one_error_line(err) == "the daemon of /dev/ublkb3 did not stop within 0.2 s"
    assert requests == ["stop", "stop"]


def test_list(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call_main(capsys, "list")
    assert (rc, out, err) == (0, "", "no devices\n")
    rc, out, _ = call_main(capsys, "list", "--json")
    assert (rc, json.loads(out)) == (0, [])
    info = fake_info(id=2, path="/dev/ublkb2", image="/dev/shm/a.img", size=256 << 20,
                     queues=2, data_path="auto-zc", pid=99)  # fmt: skip
    with serving(control.socket_path(2), {"info": info}):
        rc, out, _ = call_main(capsys, "list")
        assert rc == 0
        header, row = out.splitlines()
        assert header.split() == ["ID", "DEVICE", "IMAGE", "SIZE", "QUEUES", "DEPTH", "DATA-PATH",
                                  "STATE", "PID"]  # fmt: skip
        assert row.split() == ["2", "/dev/ublkb2", "/dev/shm/a.img", "256", "MiB", "2", "128",
                               "auto-zc", "running,rw", "99"]  # fmt: skip
        rc, out, _ = call_main(capsys, "list", "--json")
        assert json.loads(out)[0]["data_path"] == "auto-zc"


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = call_main(capsys, "--help")
    assert rc == 0 and "serve" in out and "features" in out
    assert "--data-path" not in call_main(capsys, "serve", "--help")[1]
    rc, out, _ = call_main(capsys, "--version")
    assert rc == 0 and "0.1.0" in out


# --- as a real process: exit status and stderr exactly as a user sees them -----------------


def test_process_bad_input_is_one_line(images: Path) -> None:
    for argv, status in [
        (["serve", str(images / "missing.img")], 1),
        (["serve", str(images / "dir")], 1),
        (["serve", "--depth", "0", str(images / "ok.img")], 2),
        (["stop", "12345"], 1),
        (["nonsense"], 2),
    ]:
        r = run_cli(*argv)
        assert r.returncode == status, (argv, r.stderr)
        assert r.stdout == ""
        one_error_line(r.stderr)
        assert "Traceback" not in r.stderr


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ubm-nobody-", dir="/dev/shm"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_process_not_root(world_readable_dir: Path) -> None:
    image = world_readable_dir / "ok.img"
    image.write_bytes(b"\0" * 4096)
    image.chmod(0o666)
    r = run_cli("serve", str(image), as_nobody=True)
    assert r.returncode == 1, r.stderr
    assert one_error_line(r.stderr) == "must run as root (ublk devices need CAP_SYS_ADMIN)"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_process_unreadable_image(world_readable_dir: Path) -> None:
    image = world_readable_dir / "secret.img"
    image.write_bytes(b"\0" * 4096)
    image.chmod(0o600)
    r = run_cli("serve", "--read-only", str(image), as_nobody=True)
    assert r.returncode == 1, r.stderr
    assert one_error_line(r.stderr) == (f"cannot open image {image} for reading: Permission denied")
    image.chmod(0o644)  # readable, not writable: serving it read-write says how to go read-only
    r = run_cli("serve", str(image), as_nobody=True)
    assert one_error_line(r.stderr) == (
        f"cannot open image {image} for reading and writing: Permission denied "
        "(--read-only serves it read-only)"
    )
