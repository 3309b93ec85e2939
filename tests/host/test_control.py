"""The control protocol over a real unix socket, with fake handlers."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.control_fakes import fake_info, serving

from ublkmig import control
from ublkmig.errors import UserError


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return {"echo": args}


async def refuse(args: dict[str, Any]) -> dict[str, Any]:
    raise control.ControlError("not now")


async def crash(args: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


def raw_exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_round_trip(run_dir: Path) -> None:
    path = control.socket_path(3)
    assert path == run_dir / "ublkb3.sock"
    with serving(path, {"echo": echo}):
        assert control.request(path, "echo", x=1, name="a") == {"echo": {"x": 1, "name": "a"}}
        assert not control.wait_gone(path, os.getpid(), 0.1)
    assert not path.exists(), "the server removes its socket when it stops"
    assert control.wait_gone(path, os.getpid(), 0.1)
    with pytest.raises(control.DaemonGone):
        control.request(path, "echo")


def test_permissions(tmp_path: Path) -> None:
    d = tmp_path / "run"
    path = d / "ublkb0.sock"
    with serving(path, {"echo": echo}):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_errors_are_responses(run_dir: Path) -> None:
    path = control.socket_path(0)
    with serving(path, {"echo": echo, "refuse": refuse, "crash": crash}):
        with pytest.raises(control.ControlError, match="unknown command 'nope'.*crash, echo"):
            control.request(path, "nope")
        with pytest.raises(control.ControlError, match="not now"):
            control.request(path, "refuse")
        with pytest.raises(control.ControlError, match="internal error in 'crash': boom"):
            control.request(path, "crash")
        # the server survives all of that
        assert control.request(path, "echo") == {"echo": {}}


def test_many_requests_on_one_connection_and_bad_lines(run_dir: Path) -> None:
    path = control.socket_path(1)
    with serving(path, {"echo": echo}):
        lines = b'{"cmd":"echo","n":1}\n{not json}\n[1,2]\n{"x":1}\n{"cmd":"echo","n":2}\n'
        responses = raw_exchange(path, lines)
    assert responses[0] == {"ok": True, "echo": {"n": 1}}
    assert responses[1]["ok"] is False and "bad JSON" in responses[1]["error"]
    assert responses[2] == {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
    assert responses[3]["ok"] is False
    assert responses[4] == {"ok": True, "echo": {"n": 2}}


def test_overlong_line(run_dir: Path) -> None:
    path = control.socket_path(1)
    with serving(path, {"echo": echo}):
        responses = raw_exchange(path, b"x" * (control.MAX_LINE + 10))
        assert responses == [{"ok": False, "error": "request line too long"}]
        assert control.request(path, "echo") == {"echo": {}}


def test_no_daemon(run_dir: Path) -> None:
    with pytest.raises(control.DaemonGone):
        control.request(control.socket_path(9), "info")
    assert control.list_daemons() == []


def test_list_daemons_skips_and_removes_stale_sockets(run_dir: Path) -> None:
    stale = run_dir / "ublkb2.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: a daemon that died
    assert stale.exists()
    live = control.socket_path(7)
    with serving(live, {"info": fake_info(id=7, path="/dev/ublkb7")}):
        daemons = control.list_daemons()
    assert [d["id"] for d in daemons] == [7]
    assert not stale.exists()


def test_list_daemons_sorted_by_id(run_dir: Path) -> None:
    ids = (10, 2, 1)
    with (
        serving(control.socket_path(10), {"info": fake_info(id=10)}),
        serving(control.socket_path(2), {"info": fake_info(id=2)}),
        serving(control.socket_path(1), {"info": fake_info(id=1)}),
    ):
        assert [d["id"] for d in control.list_daemons()] == sorted(ids)


def test_missing_run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(control.ENV_RUN_DIR, str(tmp_path / "absent"))
    assert control.sockets() == []


def test_unreadable_run_dir_as_non_root(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UserError, match="permission denied.*run as root"):
        control.sockets()


def test_wait_gone_when_the_process_ends(run_dir: Path) -> None:
    path = run_dir / "ublkb0.sock"
    path.touch()  # a socket left behind by a daemon that died
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert control.wait_gone(path, proc.pid, 5)
