"""Nothing waits forever on the destination: the data plane's NBD client against a server that
stops answering, trickles its handshake, holds a flush, or answers with the wrong cookie
(tests/support/faulty_nbd.py), through the simulator.  Each wait that would hang on a client
without deadlines runs in a watchdog thread, so a regression fails instead of hanging."""

from __future__ import annotations

import errno
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support.faulty_nbd import FaultyNbd
from test_migration import FAST, Run

from ublkmig import native
from ublkmig.migration import Mode, Phase
from ublkmig.native import MigMode, MigrationConfig, NativeError, Op, Pass, Sim

pytestmark = pytest.mark.skipif(not native.available(), reason="data plane not built")

SIZE = 4 << 20
CHUNK = 64 << 10
TIMEOUT_MS = 600


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ubm-dl-", dir="/var/tmp"))
    (d / "src.img").write_bytes(random.Random(7).randbytes(SIZE))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() in a thread; fails the test if it has not returned within ``seconds``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised below
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        pytest.fail(f"still waiting after {seconds} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def config(srv: FaultyNbd, timeout_ms: int = TIMEOUT_MS) -> MigrationConfig:
    return MigrationConfig(dest=srv.uri, mode=MigMode.MIRROR, chunk_size=CHUNK,
                           dest_timeout_ms=timeout_ms)  # fmt: skip


def test_a_server_that_stops_answering_releases_the_guest_write(tmp: Path) -> None:
    """Mirrored writes to a server that takes them and never answers complete from the source
    once the timeout passes; the connection counts as lost, the chunk is dirty."""
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = sim.target()
        t.mig_start(config(srv))
        t.copy_pass(Pass.ALL)
        srv.silent = True
        t0 = time.monotonic()
        sim.submit(Op.WRITE, 2 * CHUNK, data=b"\x77" * 4096)
        c = within(10, sim.wait)
        waited = time.monotonic() - t0
        assert c is not None and c.result == 4096, c
        assert TIMEOUT_MS / 1000 * 0.8 <= waited < 5, waited
        s = t.stats()
        assert s.error == -errno.ETIMEDOUT and s.dirty_chunks == 1 and s.dest_down >= 1, s
        srv.silent = False
        t.reconnect()  # the server answers again: the chunk is copied again, then the switch
        t.copy_pass(Pass.ALL)
        t.cutover()
        assert sim.read(2 * CHUNK, 4096) == b"\x77" * 4096
        t.finish()
    assert srv.data == (tmp / "src.img").read_bytes()  # the source had the write too


@pytest.mark.parametrize("op", [Op.WRITE, Op.FLUSH], ids=["write", "flush"])
def test_a_request_waiting_for_a_silent_server_counts_as_waiting(tmp: Path, op: Op) -> None:
    """A mirrored write, and a flush (it goes to the destination too), done on the source and
    waiting for a server that does not answer count in dest_waiting while they wait: auto
    mode's measure when nothing completes.  (A guest whose requests stuck there were all
    flushes left auto mode blind until the timeout.)  The migration then completes, byte
    for byte."""
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = sim.target()
        t.mig_start(config(srv, timeout_ms=3000))
        t.copy_pass(Pass.ALL)
        sim.write(CHUNK, b"\x66" * 8192)  # mirrored, answered
        srv.silent = True
        if op == Op.WRITE:
            sim.submit(op, 2 * CHUNK, data=b"\x77" * 4096)
        else:
            sim.submit(op)
        t0 = time.monotonic()
        while t.stats().dest_waiting == 0 and time.monotonic() - t0 < 2:
            sim.poll()
            time.sleep(0.01)
        time.sleep(0.1)
        s = t.stats()
        assert s.dest_waiting == 1 and s.dest_waiting_ns >= 100e6, s
        c = within(10, sim.wait)  # the timeout ends it, from the source
        assert c is not None and c.result >= 0, c
        assert t.stats().dest_waiting == 0
        srv.silent = False
        t.reconnect()  # what the lost connection may have lost is copied again, then the switch
        t.copy_pass(Pass.ALL)
        t.cutover()
        assert sim.read(CHUNK, 8192) == b"\x66" * 8192
        t.finish()
    assert srv.data == (tmp / "src.img").read_bytes()


def test_the_copier_gives_up_on_a_silent_server(tmp: Path) -> None:
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = sim.target()
        t.mig_start(config(srv))
        srv.silent = True
        with pytest.raises(NativeError) as e:
            within(10, lambda: t.copy_pass(Pass.ALL))
        assert e.value.errno == errno.ETIMEDOUT, e.value
        srv.silent = False
        t.finish()  # the source stays; nothing is held


@pytest.mark.parametrize("interval", [0.2, 0.0], ids=["slow", "flood"])
def test_a_trickling_handshake_is_given_up(tmp: Path, interval: float) -> None:
    """A server that answers NBD_OPT_GO with ignorable replies for ever: refused within the
    deadline (slowly), or after at most 64 replies (a flood)."""
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        srv.trickle, srv.trickle_interval = True, interval
        t0 = time.monotonic()
        with pytest.raises(NativeError) as e:
            within(10, lambda: sim.target().mig_start(config(srv, timeout_ms=1000)))
        assert time.monotonic() - t0 < 5
        if interval:
            assert e.value.errno == errno.ETIMEDOUT and "no answer in time" in str(e.value)
        else:
            assert e.value.errno == errno.EPROTO and "more than 64 replies" in str(e.value)


def test_a_servers_error_text_is_made_printable(tmp: Path) -> None:
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        srv.refuse = "no\x1b[2J\rway\x07"
        with pytest.raises(NativeError) as e:
            sim.target().mig_start(config(srv))
        assert e.value.errno == errno.EACCES
        assert "no?[2J?way?" in str(e.value) and "\x1b" not in str(e.value), e.value


def test_a_reply_must_carry_its_requests_whole_cookie(tmp: Path) -> None:
    """A reply whose cookie names only the tag (as a stale reply for the tag's previous request
    would) ends the connection; it never completes the tag's current request."""
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = sim.target()
        t.mig_start(config(srv))
        t.copy_pass(Pass.ALL)
        srv.short_cookies = True
        sim.write(0, b"\x78" * 4096)  # done on the source whatever the destination says
        s = t.stats()
        assert s.error == -errno.EPROTO and s.dirty_chunks == 1, s
        t.finish()


def test_stats_do_not_wait_for_a_slow_flush(tmp: Path) -> None:
    """The cutover flushes the destination on the control thread's connection; counters read
    meanwhile (status, the sampler) must not wait for that flush."""
    with FaultyNbd(SIZE) as srv, Sim(tmp / "src.img") as sim:
        t = sim.target()
        t.mig_start(config(srv, timeout_ms=5000))
        t.copy_pass(Pass.ALL)
        srv.flush_delay = 1.5
        done = threading.Event()
        slowest = 0.0

        def read_stats() -> None:
            nonlocal slowest
            while not done.is_set():
                t0 = time.monotonic()
                t.stats()
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.01)

        th = threading.Thread(target=read_stats)
        th.start()
        try:
            t0 = time.monotonic()
            t.cutover()  # this thread drives the sim
            assert time.monotonic() - t0 >= 1.4
        finally:
            done.set()
            th.join()
        assert slowest < 0.5, slowest
        t.finish()


def test_auto_mode_falls_back_while_the_destination_does_not_answer(tmp: Path) -> None:
    """Auto mode judges the writes waiting for the destination now, not only those that
    completed: a server that stops answering makes it fall back well before the timeout ends
    the connections; then it reconnects, and the migration completes byte for byte."""
    import test_migration

    with FaultyNbd(test_migration.SIZE) as srv:
        r = Run(tmp, Mode.AUTO, seed=41, dest=srv.uri, dest_zeroed=False, speed=4 << 20,
                dest_timeout=4.0, policy=FAST)  # fmt: skip
        seen: dict[str, float] = {}

        async def during(r: Run) -> None:
            await anyio.sleep(0.5)
            srv.silent = True
            # (a busy host can make it fall back before the silence: a fallback counts
            # from here; tracking then, it mirrors again 2 s after, and falls back again)
            seen["before"] = before = r.mig.fallbacks
            t0 = time.monotonic()
            while r.mig.fallbacks == before and time.monotonic() - t0 < 3.5:
                await anyio.sleep(0.02)
            seen["fell_back_after"] = time.monotonic() - t0
            srv.silent = False  # (what it took meanwhile stays unanswered: the timeout ends it)

        assert r.run(during, timeout=90) is Phase.COMPLETED, r.mig.status()
        status = r.mig.status()
        assert status["fallbacks"] > seen["before"] and seen["fell_back_after"] < 3.5, (
            seen, status)  # fmt: skip
        assert status["reconnects"] >= 1, status
        r.stop(after_io=0.2)
        assert bytes(srv.data) == bytes(r.model)
