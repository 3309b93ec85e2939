"""Migration to NBD exports served by real servers (qemu-nbd, nbdkit), through the simulator:
the data plane's NBD client (native/backends/nbd.c) with guest I/O going on, ending with a
byte-for-byte comparison of the export's file; the handshake's errors; a server that dies
mid-migration.  (tests/vm runs the same against real ublk devices.)"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support.sim_guest import SimGuest, SimTarget
from test_migration import FAST, MODES, SIZE, Run

from ublkmig import native
from ublkmig.bench.nbd_server import NbdServer, free_tcp_port, start_nbd_server
from ublkmig.migration import Migration, MigrationOptions, Mode, Phase
from ublkmig.native import Sim

pytestmark = [
    pytest.mark.skipif(not native.available(), reason="data plane not built"),
    pytest.mark.skipif(not (shutil.which("qemu-nbd") and shutil.which("nbdkit")),
                       reason="qemu-nbd and nbdkit are installed by ci/setup"),
]


@pytest.fixture
def server(tmp: Path) -> Iterator[Callable[..., NbdServer]]:
    """``server(kind, transport, file, *extra)``: a started NBD server, stopped at teardown."""
    started: list[NbdServer] = []

    def start(kind: str, transport: str, file: Path | None, *extra: str,
              params: tuple[str, ...] = ()) -> NbdServer:  # fmt: skip
        s = start_nbd_server(kind, transport, tmp, SIZE, file=file, extra=extra, params=params)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop(kill=True)


def junk_file(path: Path, size: int = SIZE) -> Path:
    path.write_bytes(b"\xa5" * size)  # everything on it must be overwritten or zeroed
    return path


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kind", "transport"), [("qemu-nbd", "tcp"), ("nbdkit-file", "unix")])
def test_migration_to_an_nbd_export(tmp: Path, server: Callable[..., NbdServer], mode: Mode,
                                    kind: str, transport: str) -> None:
    export = junk_file(tmp / "export.img")
    srv = server(kind, transport, export)
    r = Run(tmp, mode, seed=31, dest=srv.uri, dest_zeroed=False, speed=None, verify=True)
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    assert status["dest"] == srv.uri and status["verify_mismatches"] == 0, status
    done = r.guest.counters.completed
    r.stop(after_io=0.3)  # reads and writes after the cutover go to the export
    assert r.guest.counters.completed > done
    r.assert_file_is_model(export)


def test_memory_export_then_read_back(tmp: Path, server: Callable[..., NbdServer]) -> None:
    srv = server("nbdkit-memory", "tcp", None)
    r = Run(tmp, Mode.MIRROR, seed=32, dest=srv.uri, dest_zeroed=False, speed=None)
    assert r.run() is Phase.COMPLETED, r.mig.status()
    r.stop(after_io=0.2)
    r.assert_file_is_model(srv.read_export(tmp / "read-back.img"))


def kill_midway(srv: NbdServer, back_after: float | None) -> Callable[[Run], Any]:
    """``during`` for Run.run: kill the server a quarter into the copy; with ``back_after``,
    start it again (same file, same socket) that many seconds later."""

    async def during(run: Run) -> None:
        while run.mig.status()["cursor"] < SIZE / 4:
            await anyio.sleep(0.005)
        srv.stop(kill=True)
        if back_after is not None:
            await anyio.sleep(back_after)
            srv.restart()

    return during


@pytest.mark.parametrize("mode", MODES)
def test_server_killed_and_restarted_the_migration_completes(
    tmp: Path, server: Callable[..., NbdServer], mode: Mode, capsys: pytest.CaptureFixture[str]
) -> None:
    export = junk_file(tmp / "export.img")
    srv = server("nbdkit-file", "unix", export)
    r = Run(tmp, mode, seed=34, dest=srv.uri, dest_zeroed=False, speed=4 << 20,
            verify=True)  # fmt: skip
    assert r.run(kill_midway(srv, back_after=0.5)) is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    assert status["reconnects"] >= 1 and status["dest_down"] == 0, status
    assert status["verify_mismatches"] == 0
    assert "reconnecting" in r.phases()
    done = r.guest.counters.completed
    r.stop(after_io=0.2)  # no guest error (checked by stop)
    assert r.guest.counters.completed > done
    r.assert_file_is_model(export)
    err = capsys.readouterr().err
    assert "event=migration.destination_lost" in err and "event=migration.reconnected" in err


def test_server_gone_for_good_fails_cleanly(tmp: Path, server: Callable[..., NbdServer]) -> None:
    export = junk_file(tmp / "export.img")
    srv = server("nbdkit-file", "unix", export)
    policy = dataclasses.replace(FAST, reconnect_budget=1.0)
    r = Run(tmp, Mode.MIRROR, seed=33, dest=srv.uri, dest_zeroed=False, speed=4 << 20,
            policy=policy)  # fmt: skip
    assert r.run(kill_midway(srv, back_after=None)) is Phase.FAILED, r.mig.status()
    error = r.mig.status()["error"]
    assert error.startswith("the destination failed: ") and "did not come back within 1 s" in error
    done = r.guest.counters.completed
    r.stop(after_io=0.2)  # no guest error (checked by stop): the source serves on
    assert r.guest.counters.completed > done
    r.assert_file_is_model(r.source)


def test_auto_falls_back_from_a_slow_destination(
    tmp: Path, server: Callable[..., NbdServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every write to the export waits 40 ms (nbdkit's delay filter): mirrored writes wait
    for it well past the 20 ms threshold, so auto mode falls back to dirty tracking, tries
    mirroring again after a while (and falls back again), and after its last fallback
    mirrors to converge; the cutover needs no pause; the export ends equal to the model."""
    export = junk_file(tmp / "export.img")
    srv = server("nbdkit-file", "unix", export, "--filter=delay", params=("delay-write=40ms",))
    policy = dataclasses.replace(FAST, auto_probe=0.3, auto_max_fallbacks=2)
    r = Run(tmp, Mode.AUTO, seed=35, dest=srv.uri, dest_zeroed=False, speed=None,
            policy=policy)  # fmt: skip
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(export)
    # (how many times depends on how fast the copy goes: at most the limit)
    n = status["fallbacks"]
    assert 1 <= n <= 2 and status["mirror_returns"] == n, status
    assert status["writes"] == "mirrored" and status["final_pause_ms"] is None, status
    assert status["tracked_writes"] > 0 and status["mirrored_writes"] > 0, status
    calls = [c for c in r.target.calls if c.startswith("set_mode")]
    assert calls == ["set_mode dbt", "set_mode mirror"] * n, calls
    err = capsys.readouterr().err.splitlines()
    fallbacks = [line for line in err if "event=migration.fallback" in line]
    assert len(fallbacks) == n
    for line in fallbacks:  # each when the mean wait was over the threshold
        waited = float(line.split("mirror_wait_ms=")[1].split()[0])
        assert waited > 20 and "threshold_ms=20.0" in line, line
    assert sum("event=migration.mirror_again" in line for line in err) == n


def test_auto_mirrors_again_when_dirty_tracking_cannot_converge(
    tmp: Path, server: Callable[..., NbdServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The guest (unthrottled, on a fast source) dirties chunks faster than the copier can
    clean them on an export whose writes wait 40 ms: once the first copy is done and the dirty
    passes stop shrinking the dirty set, auto mode mirrors again for good (long before its
    probe timer), converges and cuts over without a pause."""
    export = junk_file(tmp / "export.img")
    srv = server("nbdkit-file", "unix", export, "--filter=delay", params=("delay-write=40ms",))
    policy = dataclasses.replace(FAST, auto_probe=600.0)  # only the dirty count brings it back
    r = Run(tmp, Mode.AUTO, seed=37, dest=srv.uri, dest_zeroed=False, speed=None,
            policy=policy)  # fmt: skip
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(export)
    assert status["fallbacks"] == 1 and status["mirror_returns"] == 1, status
    assert status["writes"] == "mirrored" and status["final_pause_ms"] is None, status
    err = capsys.readouterr().err.splitlines()
    again = [line for line in err if "event=migration.mirror_again" in line]
    assert len(again) == 1 and "dirty tracking is not converging" in again[0], again
    assert "final=true" in again[0], again


def test_auto_stays_mirroring_to_a_fast_destination(
    tmp: Path, server: Callable[..., NbdServer]
) -> None:
    export = junk_file(tmp / "export.img")
    srv = server("nbdkit-file", "unix", export)
    r = Run(tmp, Mode.AUTO, seed=36, dest=srv.uri, dest_zeroed=False, speed=8 << 20)
    assert r.run() is Phase.COMPLETED, r.mig.status()
    status = r.mig.status()
    r.stop()
    r.assert_file_is_model(export)
    assert status["fallbacks"] == 0 and status["tracked_writes"] == 0, status
    assert status["mirror_wait_ms"] is not None and status["mirror_wait_ms"] < 20, status


def start_error(tmp: Path, uri: str) -> str:
    """What starting a migration to ``uri`` says (it must refuse)."""
    source = tmp / "source.img"
    source.write_bytes(bytes(SIZE))
    sim = Sim(source)
    guest = SimGuest(sim, bytearray(SIZE), io=False).start()
    try:
        mig = Migration(SimTarget(guest), MigrationOptions(uri), device="d", source=str(source),
                        size=SIZE)  # fmt: skip
        with pytest.raises(Exception) as e:
            anyio.run(mig.start)
        assert mig.phase is Phase.FAILED
        return str(e.value)
    finally:
        guest.stop()
        sim.close()


def test_bad_destinations_one_line_each(tmp: Path, server: Callable[..., NbdServer]) -> None:
    small = tmp / "small.img"
    small.write_bytes(bytes(SIZE // 2))
    big = tmp / "big.img"
    big.write_bytes(bytes(SIZE))
    closed = free_tcp_port()
    cases = [
        (f"nbd://127.0.0.1:{closed}/disk", "cannot connect to 127.0.0.1 port "
         f"{closed}: Connection refused"),
        (f"nbd+unix:///disk?socket={tmp}/none.sock", "No such file or directory"),
        ("nbd://no-such-host.invalid/disk", "cannot resolve no-such-host.invalid"),
        ("nbd+unix:///disk", "not an NBD URI (the query must be ?socket=PATH)"),
        ("nbds://example.com/disk", "NBD over TLS is not supported"),
        (server("nbdkit-file", "unix", small).uri, "is smaller than the source"),
        (server("qemu-nbd", "tcp", big, "-r").uri, "the NBD export is read-only"),
        (server("qemu-nbd", "tcp", big, "--shared=1").uri, "does not offer multi-conn"),
    ]
    srv = server("qemu-nbd", "tcp", big)  # (nbdkit serves any name asked for)
    cases.append((srv.uri.replace("/disk", "/other"), "the NBD server has no export named "
                  "'other'"))
    for uri, expect in cases:
        text = start_error(tmp, uri)
        assert expect in text, (uri, text)
        assert text.startswith(f"cannot start the migration to {uri}: "), text
        assert "\n" not in text
