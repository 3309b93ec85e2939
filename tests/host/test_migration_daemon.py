"""Migration through the daemon and the CLI: `serve` with a fake device whose migration target
is the real data plane on a simulator of the image (fake_serve.py), the real control socket,
validation, locks, logs, and the `migrate`/`status`/`cutover`/`cancel`/`speed` commands."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import call_main, one_error_line
from support.control_fakes import fake_info, serving
from support.serve import Served, events, spawn_fake_serve

from ublkmig import control, native, state
from ublkmig.cli import main
from ublkmig.client import Client, MigrateRequest

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

HERE = Path(__file__).resolve().parent
SIZE = 8 << 20
DEV = "/dev/ublkb42"
POLICY = {"cutover_window": 0.1, "sample_interval": 0.05, "in_sync_dirty_interval": 0.1}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    rng = random.Random(5)
    with open(p, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 1 << 20):
            if off % (3 << 20):  # every third MiB a hole
                f.seek(off)
                f.write(rng.randbytes(1 << 19))
    return p


@pytest.fixture
def daemon(image: Path, run_dir: Path) -> Iterator[Served]:
    d = spawn_fake_serve(image, run_dir, env={"UBLKMIG_FAKE_POLICY": json.dumps(POLICY)})
    try:
        assert d.first_line() == f"{image}\n"
        yield d
    finally:
        if d.proc.poll() is None:
            d.kill()


def status(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc, out, err = call_main(capsys, "status", "--json", "42")
    assert rc == 0, err
    return json.loads(out)


def test_migrate_wait_completes_and_serves_the_destination(
    daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dir: Path
) -> None:
    before = daemon.image.read_bytes()
    st = status(capsys)
    assert st["migration"] is None and st["image"] == str(daemon.image)
    rc, out, _ = call_main(capsys, "status", "42")
    assert rc == 0 and out.splitlines()[1] == "no migration"

    dest = tmp_path / "new" / "dest.img"
    dest.parent.mkdir()
    rc, out, err = call_main(capsys, "migrate", DEV, "--to", str(dest), "--chunk-size", "256K",
                             "--wait")  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"migrating {DEV} to {dest} (auto, chunks of 256 KiB)"
    assert lines[-1].startswith(f"completed: {DEV} now serves {dest} (in ")
    assert "cutover stall" in lines[-1]
    assert any(" auto copying" in line for line in lines[1:-1]), lines
    assert dest.read_bytes() == before, "the destination equals the source"
    assert daemon.image.read_bytes() == before, "the source is untouched"
    assert os.stat(dest).st_blocks * 512 < SIZE, "holes were not copied (the new file is sparse)"

    st = status(capsys)
    mig = st["migration"]
    assert st["image"] == str(dest), "the daemon serves the destination now"
    assert mig["phase"] == "completed" and mig["mode"] == "auto" and mig["error"] is None
    assert mig["chunk_size"] == 256 << 10 and mig["bytes_to_copy"] == 0
    assert mig["bytes_copied"] + mig["bytes_skipped"] == SIZE
    rc, out, _ = call_main(capsys, "list", "--json")
    [info] = json.loads(out)
    assert info["image"] == str(dest)
    assert info["migration"] == {"mode": "auto", "phase": "completed", "dest": str(dest)}
    # the daemon holds the destination's lock now, and let go of the old image's
    fd = os.open(dest, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    fd = os.open(daemon.image, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)

    rc, _, err = call_main(capsys, "migrate", "42", "--to", str(tmp_path / "again.img"))
    assert rc == 1
    assert one_error_line(err) == (
        f"{DEV} was migrated already (it now serves {dest}); serve that image again to "
        "migrate it further"
    )
    assert main(["stop", "42"]) == 0
    rc, _, err = daemon.finish()
    assert rc == 0, err
    evs = events(err)
    assert "migration.phase" in evs and "device.image_changed" in evs
    assert "Traceback" not in err
    phases = [line.split("phase=")[1].split()[0] for line in err.splitlines()
              if "event=migration.phase" in line]  # fmt: skip
    assert phases == ["starting", "copying", "cutover", "completed"]

    # a reboot loses /run (and the device); the old image is still known not to be the disk
    for p in run_dir.iterdir():
        p.unlink()
    capsys.readouterr()
    rc, out, err = call_main(capsys, "serve", str(daemon.image))
    assert rc == 1 and out == ""
    assert one_error_line(err) == (
        f"{daemon.image} is not the disk any more: {DEV} migrated to {dest}, which holds every "
        "write since; serve that (or pass --force to serve this old copy)"
    )
    rc, _, err = call_main(capsys, "serve", str(daemon.image), "--force")
    assert rc == 1 and "is not the disk any more" not in err  # (refused later: no ublk here)


@pytest.mark.parametrize("mode", ["dbt", "snapshot"])
def test_other_modes_through_the_daemon(
    daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"\x5a" * SIZE)  # an existing destination is used as it is
    rc, out, err = call_main(capsys, "migrate", "42", "--to", str(dest), "--mode", mode,
                             "--verify", "--wait")  # fmt: skip
    assert rc == 0, err
    assert "final pause" in out.splitlines()[-1]
    assert dest.read_bytes() == daemon.image.read_bytes()
    mig = status(capsys)["migration"]
    assert mig["mode"] == mode and mig["verify_mismatches"] == 0
    assert mig["final_pause_ms"] is not None


def test_no_cutover_then_cutover(
    daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest.img"
    rc, out, err = call_main(capsys, "migrate", "42", "--to", str(dest), "--mode", "dbt",
                             "--no-cutover", "--wait")  # fmt: skip
    assert rc == 0, err
    assert out.splitlines()[-1] == (
        f"in sync: {DEV} is kept in sync with {dest}; `ublkmig cutover {DEV}` switches"
    )
    assert status(capsys)["migration"]["phase"] == "in-sync"
    rc, out, _ = call_main(capsys, "status", "42")
    assert f"migration      dbt to {dest}: in-sync" in out
    rc, out, err = call_main(capsys, "cutover", "42")
    assert rc == 0, err
    assert out.startswith(f"completed: {DEV} now serves {dest}")
    assert dest.read_bytes() == daemon.image.read_bytes()


def test_cancel(daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = daemon.image.read_bytes()
    dest = tmp_path / "dest.img"
    rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest), "--speed", "2M",
                           "--chunk-size", "64K")  # fmt: skip
    assert rc == 0, err
    assert dest.exists()
    rc, _, err = call_main(capsys, "cutover", "42")
    assert rc == 1 and one_error_line(err).startswith("not in sync yet: /dev/ublkb42 is copying (")
    rc, out, err = call_main(capsys, "speed", "42", "3M/s")
    assert (rc, out) == (0, f"speed of {DEV}'s migration: 3 MiB/s\n"), err
    assert status(capsys)["migration"]["speed"] == 3 << 20
    rc, out, err = call_main(capsys, "cancel", "42")
    assert rc == 0, err
    assert out == f"cancelled: {DEV} keeps serving {daemon.image}\n"
    mig = status(capsys)["migration"]
    assert mig["phase"] == "cancelled" and mig["error"] is None
    assert not dest.exists(), "the destination the migration created is gone"
    assert daemon.image.read_bytes() == before
    rc, _, err = call_main(capsys, "cancel", "42")
    assert rc == 1 and one_error_line(err) == f"no migration is running on {DEV}"
    # and a new migration may start
    rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest), "--wait")
    assert rc == 0, err


def test_stop_cancels_a_running_migration(
    daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest.img"
    rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest), "--speed", "1M")
    assert rc == 0, err
    daemon.proc.send_signal(signal.SIGTERM)
    rc, _, err = daemon.finish()
    assert rc == 0, err
    evs = events(err)
    cancelled = [line for line in err.splitlines() if "phase=cancelled" in line]
    assert len(cancelled) == 1 and "reason=SIGTERM" in cancelled[0], err
    assert evs.index("migration.phase") < evs.index("device.stopping")
    assert err.index("phase=cancelled") < err.index("event=device.stopping")
    assert not dest.exists()


def test_watch_reports_a_cancel(daemon: Served, tmp_path: Path, run_dir: Path) -> None:
    dest = tmp_path / "dest.img"
    Client(42).migrate(MigrateRequest(to=str(dest), speed=1 << 20))
    env = {**os.environ, control.ENV_RUN_DIR: str(run_dir), "PYTHONPATH": str(HERE.parents[1])}
    watch = subprocess.Popen(
        [sys.executable, "-m", "ublkmig", "status", "--watch", "42"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert watch.stdout is not None
    first = watch.stdout.readline()  # a line per phase when stdout is not a terminal
    assert f"{DEV} auto copying (pass 1: all): " in first
    Client(42).cancel()
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 1
    assert f"{DEV} auto cancel" in out
    assert one_error_line(err) == (
        f"the migration of {DEV} was cancelled; it keeps serving {daemon.image}"
    )


# --- bad input: one line each -------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Path:
    p = tmp_path / "small.img"
    p.write_bytes(bytes(1 << 20))
    return p


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "{small}"], "the destination {small} (1048576 bytes, 1 MiB) is smaller than "
         "the source (8388608 bytes, 8 MiB)"),
        (["--to", "{tmp}/missing/dest.img"], "the destination's directory does not exist: "
         "{tmp}/missing"),
        (["--to", "{image}"], "the destination is the source: {image}"),
        (["--to", "{tmp}"], "the destination is a directory: {tmp}"),
        (["--to", "/dev/null"], "the destination is not a regular file or a block device: "
         "/dev/null"),
        (["--to", "{tmp}/d.img", "--chunk-size", "100K"], "chunk size must be a power of two "
         "from 64 KiB to 64 MiB, not 102400 bytes"),
        (["--to", "{tmp}/d.img", "--chunk-size", "128M"], "chunk size must be a power of two"),
        (["--to", "{tmp}/d.img", "--chunk-size", "32K"], "chunk size must be a power of two"),
        (["--to", "{tmp}/d.img", "--speed", "0"], "speed must be more than 0 bytes/s"),
        (["--to", "{tmp}/d.img", "--mode", "snapshot", "--chunk-size", "64K"],
         "cannot start the migration to {tmp}/d.img: snapshot mode needs chunks of at least"),
    ],
)  # fmt: skip
def test_bad_input(
    daemon: Served,
    tmp_path: Path,
    small: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    fill = {"small": small, "tmp": tmp_path, "image": daemon.image}
    rc, out, err = call_main(capsys, "migrate", "42", *[a.format(**fill) for a in args])
    assert rc == 1 and out == ""
    assert one_error_line(err).startswith(message.format(**fill))
    assert not (tmp_path / "d.img").exists(), "nothing left behind"
    assert status(capsys)["migration"] is None, "a refused migration leaves no trace"


def test_destination_in_use(
    daemon: Served, tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest.img"
    dest.write_bytes(bytes(SIZE))
    fd = os.open(dest, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest))
        assert rc == 1
        assert one_error_line(err) == (
            f"the destination {dest} is in use by another migration or process (it is locked)"
        )
        # locked by a daemon that serves it as its image
        info = fake_info(id=4, path="/dev/ublkb4", image=str(dest), pid=4242)
        with serving(control.socket_path(4), {"info": info}):
            rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest))
        assert one_error_line(err) == (
            f"the destination {dest} is in use by /dev/ublkb4 (pid 4242), serving it"
        )
        # locked by another daemon's migration
        info = fake_info(id=5, path="/dev/ublkb5", migration_dest=str(dest), pid=4343)
        with serving(control.socket_path(5), {"info": info}):
            rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest))
        assert one_error_line(err) == (
            f"the destination {dest} is in use by /dev/ublkb5 (pid 4343), migrating to it"
        )
    finally:
        os.close(fd)
    assert dest.read_bytes() == bytes(SIZE)


def test_one_migration_at_a_time(
    daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest.img"
    rc, _, err = call_main(capsys, "migrate", "42", "--to", str(dest), "--no-cutover")
    assert rc == 0, err
    rc, _, err = call_main(capsys, "migrate", "42", "--to", str(tmp_path / "other.img"))
    assert rc == 1
    assert one_error_line(err).startswith(
        f"a migration is already running on {DEV} (auto to {dest}, "
    )
    # the daemon's own running migration holds the destination
    info = json.loads(call_main(capsys, "list", "--json")[1])[0]
    assert info["migration_dest"] == str(dest)
    rc, _, err = call_main(capsys, "cancel", "42")
    assert rc == 0, err


def test_no_daemon(run_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (["migrate", "7", "--to", str(tmp_path / "d.img")], ["status", "7"],
                 ["cutover", "7"], ["cancel", "7"], ["speed", "7", "1M"]):  # fmt: skip
        rc, out, err = call_main(capsys, *argv)
        assert rc == 1 and out == ""
        assert one_error_line(err) == "no ublkmig daemon serves /dev/ublkb7", argv


def test_commands_without_a_migration(daemon: Served, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["cutover", "42"], ["cancel", "42"], ["speed", "42", "1M"]):
        rc, _, err = call_main(capsys, *argv)
        assert rc == 1
        assert one_error_line(err) == f"no migration is running on {DEV}", argv
    rc, out, _ = call_main(capsys, "status", "--watch", "42")
    assert rc == 0 and "no migration" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, 'migrate needs "to": the destination path'),
        ({"to": "rel.img"}, "the destination must be an absolute path, not rel.img"),
        ({"to": "/x.img", "mode": "teleport"},
         "unknown migration mode 'teleport' (known: auto, mirror, dbt, snapshot)"),
        ({"to": "/x.img", "chunk_size": "1M"}, "chunk_size must be an integer, not '1M'"),
        ({"to": "/x.img", "chunk_size": 3}, "chunk size must be a power of two"),
        ({"to": "/x.img", "speed": -1}, "speed must be more than 0 bytes/s"),
        ({"to": "/x.img", "verify": "yes"}, "verify must be true or false"),
        ({"to": "/x.img", "yield": 1}, "yield must be true or false"),
    ],
)  # fmt: skip
def test_protocol_bad_migrate_requests(daemon: Served, args: dict[str, Any], message: str) -> None:
    with pytest.raises(control.ControlError) as e:
        control.request(control.socket_path(42), "migrate", **args)
    assert str(e.value).startswith(message)


def test_resume_goes_on_with_the_saved_options(
    daemon: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migrate --resume`` takes the interrupted migration's options from its saved state
    (here dbt, and a copier that does not yield) and compares what lies below ``reach``."""
    dest = tmp_path / "dest.img"
    shutil.copyfile(daemon.image, dest)  # an earlier copy: the first chunks are there
    state.write(state.migration_path(42), {
        "device": DEV, "source": str(daemon.image), "dest": str(dest), "mode": "dbt",
        "chunk_size": 1 << 20, "speed": None, "no_cutover": False, "verify": False,
        "fallback_wait_ms": 20.0, "yield": False, "phase": "copying", "reach": 4,
        "chunks": SIZE >> 20, "cut_over": False, "updated": time.time(),
    })  # fmt: skip
    rc, out, err = call_main(capsys, "migrate", "42", "--resume", "--wait")
    assert rc == 0, err
    mig = status(capsys)["migration"]
    assert mig["phase"] == "completed" and mig["mode"] == "dbt" and mig["resumed"], mig
    assert mig["busy_depth"] == 0 and mig["yielded_seconds"] == 0, mig
    assert mig["bytes_matched"] == 4 << 20, mig  # the 4 chunks below reach, all equal
    assert dest.read_bytes() == daemon.image.read_bytes()
