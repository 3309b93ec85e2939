"""The typed client of a daemon (ublkmig/client.py) against a fake daemon on a real socket:
its commands, its errors, and the one wait on a migration that the CLI, the bench and the VM
tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.control_fakes import serving

from ublkmig import control
from ublkmig.client import Client, ControlError, DaemonGone, MigrateRequest, WaitTimeout


class FakeMigration:
    """A daemon whose migration goes through ``phases``, one per status request (then stays in
    the last); ``None`` is no migration."""

    def __init__(self, *phases: str | None) -> None:
        self.phases = list(phases)
        self.asked = 0
        self.migrate_args: dict[str, Any] | None = None

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        phase = self.phases[min(self.asked, len(self.phases) - 1)]
        self.asked += 1
        mig = None if phase is None else {"phase": phase, "n": self.asked}
        return {"id": 6, "migration": mig}

    async def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        self.migrate_args = args
        return {"migration": {"phase": "starting"}}

    def handlers(self) -> dict[str, control.Handler]:
        return {"status": self.status, "migrate": self.migrate}


def test_device_is_named_by_number_or_node(run_dir: Path) -> None:
    assert Client(6).path == Client("/dev/ublkb6").path == Client("6").path
    assert Client(6).path == run_dir / "ublkb6.sock" and Client(6).node == "/dev/ublkb6"
    with pytest.raises(ValueError):
        Client("/dev/sda")


def test_no_daemon_is_one_line_and_a_dead_socket_is_removed(run_dir: Path) -> None:
    with pytest.raises(DaemonGone, match=r"^no ublkmig daemon serves /dev/ublkb6$"):
        Client(6).info()
    import socket

    dead = run_dir / "ublkb6.sock"
    with socket.socket(socket.AF_UNIX) as s:  # bound, never listening: a dead daemon's socket
        s.bind(str(dead))
    with pytest.raises(DaemonGone):
        Client(6).status()
    assert not dead.exists()


def test_a_refusal_is_the_daemons_line(run_dir: Path) -> None:
    async def cutover(args: dict[str, Any]) -> dict[str, Any]:
        raise ControlError("the migration of /dev/ublkb6 is not in sync")

    with serving(Client(6).path, {"cutover": cutover}):
        with pytest.raises(ControlError, match="^the migration of /dev/ublkb6 is not in sync$"):
            Client(6).cutover()


def test_migrate_sends_every_option_the_daemon_parses(run_dir: Path) -> None:
    from ublkmig.daemon import parse_migrate_args

    fake = FakeMigration("starting")
    req = MigrateRequest(to="/d.img", mode="dbt", speed=5 << 20, yields=False, verify=True)
    with serving(Client(6).path, fake.handlers()):
        assert Client(6).migrate(req) == {"phase": "starting"}
    assert fake.migrate_args == req.args()
    opts = parse_migrate_args(req.args())
    assert (str(opts.mode), opts.speed, opts.verify, opts.busy_depth) == ("dbt", 5 << 20, True, 0)


def test_wait_returns_when_the_migration_ends(run_dir: Path) -> None:
    fake = FakeMigration("copying", "copying", "completed")
    seen: list[str] = []
    with serving(Client(6).path, fake.handlers()):
        mig = Client(6).wait_migration(interval=0.01, on_status=lambda m: seen.append(m["phase"]))
    assert mig["phase"] == "completed" and seen == ["copying", "copying", "completed"]


def test_wait_returns_when_the_condition_holds_or_it_ended_first(run_dir: Path) -> None:
    fake = FakeMigration("copying", "in-sync", "completed")
    with serving(Client(6).path, fake.handlers()):
        mig = Client(6).wait_migration(lambda m: m["phase"] == "in-sync", interval=0.01)
    assert mig["phase"] == "in-sync"
    fake = FakeMigration("copying", "failed")
    with serving(Client(6).path, fake.handlers()):
        mig = Client(6).wait_migration(lambda m: m["phase"] == "in-sync", interval=0.01)
    assert mig["phase"] == "failed"  # the caller tells which by its phase


def test_wait_for_a_migration_not_started_yet(run_dir: Path) -> None:
    with serving(Client(6).path, FakeMigration(None).handlers()):
        with pytest.raises(ControlError, match="^no migration is running on /dev/ublkb6$"):
            Client(6).wait_migration(interval=0.01)
    fake = FakeMigration(None, None, "copying", "cancelled")
    with serving(Client(6).path, fake.handlers()):
        assert Client(6).wait_migration(interval=0.01, before_start=True)["phase"] == "cancelled"


def test_wait_has_a_deadline(run_dir: Path) -> None:
    with serving(Client(6).path, FakeMigration("copying").handlers()):
        with pytest.raises(WaitTimeout, match="did not end within 0 s") as e:
            Client(6).wait_migration(interval=0.01, timeout=0.2)
    assert e.value.last is not None and e.value.last["phase"] == "copying"
