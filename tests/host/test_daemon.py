"""The serve daemon's control plane on the host: a fake data plane (fake_serve.py), the real
validation, flock, control socket, signal handling, logs and stdout protocol."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import sparse_image
from support.serve import Served, events, spawn_fake_serve

from ublkmig import control
from ublkmig.cli import main
from ublkmig.client import Client

EVENTS = (
    "device.added",
    "control.listening",
    "device.started",
    "device.ready",
    "device.stop_requested",
    "device.stopping",
    "device.stopped",
    "device.deleted",
)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return sparse_image(tmp_path / "disk.img", 1 << 20)


@pytest.fixture
def served(image: Path, run_dir: Path) -> Iterator[Served]:
    s = spawn_fake_serve(image, run_dir, "--queues", "2", "--depth", "64")
    yield s
    if s.proc.poll() is None:
        s.kill()


def test_stop_request(served: Served, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert served.first_line() == f"{served.image}\n"  # the fake's "block device" is the image
    sock = control.socket_path(42)
    assert sock.exists()
    info = Client(42).info()
    assert info["id"] == 42 and info["image"] == str(served.image)
    assert (info["queues"], info["depth"], info["lbs"], info["data_path"]) == (2, 64, 512, "copy")
    assert info["state"] == "running" and info["pid"] == served.proc.pid
    assert info["stats"]["reads"] == 1

    assert main(["list", "--json"]) == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)] == [42]

    # a second serve of the same image names the daemon that serves it
    assert main(["serve", "--read-only", str(served.image)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"ublkmig: error: image {served.image} is already served by {served.image} "
        f"(pid {served.proc.pid})\n"
    )

    assert main(["stop", "42"]) == 0
    assert capsys.readouterr().out == "stopped /dev/ublkb42\n"
    rc, out, err = served.finish()
    assert rc == 0 and out == f"{served.image}\n", err  # its first line, nothing more
    assert [e for e in events(err) if e in EVENTS] == list(EVENTS)
    assert "reason=request" in err
    assert err.index("fake.stop") < err.index("fake.destroy") < err.index("event=device.deleted")
    assert not sock.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops(served: Served, run_dir: Path, sig: signal.Signals) -> None:
    served.first_line()
    served.proc.send_signal(sig)
    rc, _, err = served.finish()
    assert rc == 0, err
    assert [e for e in events(err) if e in EVENTS] == list(EVENTS)
    assert f"reason={sig.name}" in err
    assert "Traceback" not in err
    assert not control.socket_path(42).exists()
    # the lock went with the daemon: the image can be served again
    again = spawn_fake_serve(served.image, run_dir)
    assert again.first_line() == f"{served.image}\n"
    again.proc.terminate()
    assert again.finish()[0] == 0


def test_signal_during_stop_is_not_fatal(served: Served) -> None:
    served.first_line()
    served.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    served.proc.send_signal(signal.SIGINT)
    rc, _, err = served.finish()
    assert rc == 0, err
    assert "fake.destroy" in err


@pytest.mark.parametrize(
    ("fail_at", "message"),
    [
        ("create", "cannot add the ublk device: ADD_DEV refused (create: EPERM)"),
        ("start", f"cannot start {'{image}'}: START_DEV failed (start: EIO)"),
    ],
)
def test_failures_clean_up(image: Path, run_dir: Path, fail_at: str, message: str) -> None:
    rc, out, err = spawn_fake_serve(image, run_dir, fail_at=fail_at).finish()
    assert rc == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("ublkmig:")]
    assert errors == ["ublkmig: error: " + message.format(image=image)]
    assert "Traceback" not in err
    if fail_at == "start":
        assert "fake.destroy" in err and "event=device.deleted" in err
    assert list(run_dir.iterdir()) == []


def test_json_logs(image: Path, run_dir: Path) -> None:
    s = spawn_fake_serve(image, run_dir, pre=("--log-json",))
    s.first_line()
    s.proc.terminate()
    rc, _, err = s.finish()
    assert rc == 0
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    added = next(r for r in records if r["event"] == "device.added")
    assert added["id"] == 42 and added["image"] == str(image) and added["path"] == "copy"
    assert added["level"] == "info" and "timestamp" in added
    assert [r["event"] for r in records if r["event"] in EVENTS] == list(EVENTS)


def test_log_level_from_environment(image: Path, run_dir: Path) -> None:
    s = spawn_fake_serve(image, run_dir, env={"UBLKMIG_LOG_LEVEL": "warning"})
    s.first_line()
    s.proc.terminate()
    rc, _, err = s.finish()
    assert rc == 0 and "event=" not in err


@pytest.mark.parametrize("quiet", [False, True])
def test_benign_asyncio_race_is_quiet(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, quiet: bool
) -> None:
    """What anyio's socket wake-ups do when a wait is cancelled as its fd becomes ready."""
    import asyncio

    import anyio

    from ublkmig import daemon

    async def race() -> None:
        if quiet:
            daemon._quiet_benign_races()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.cancel()
        loop.call_soon(fut.set_result, None)
        await asyncio.sleep(0.01)

    anyio.run(race)
    err = capsys.readouterr().err + caplog.text  # asyncio logs through logging
    assert ("InvalidStateError" in err) is not quiet, err
