"""Migration commands on the command line, without a daemon: argument parsing, sizes and speeds,
help; and the rate/duration units they use (hypothesis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.cli import call_main, one_error_line
from support.control_fakes import serving

from ublkmig import control, daemon
from ublkmig.cli import _status_lines
from ublkmig.errors import UserError
from ublkmig.units import format_duration, format_rate, format_size, parse_rate, parse_size


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["migrate", "0"], 1, "migrate needs --to DEST (or --resume)"),
        (["migrate", "0", "--resume", "--mode", "dbt", "--to", "/x"], 1,
         "--resume takes the interrupted migration's options: not --to, --mode"),
        (["migrate", "--to", "/x"], 2, "Missing argument 'DEVICE'"),
        (["migrate", "sda", "--to", "/x"], 2, "'sda' is not a ublk device"),
        (["migrate", "0", "--to", "/x", "--mode", "teleport"], 2,
         "'teleport' is not one of 'auto', 'mirror', 'dbt', 'snapshot'"),
        (["migrate", "0", "--to", "/x", "--chunk-size", "big"], 2, "not a size: 'big'"),
        (["migrate", "0", "--to", "/x", "--speed", "fast"], 2, "not a speed: 'fast'"),
        (["migrate", "0", "--to", "/x", "--chunk-size", "1000K"], 1,
         "chunk size must be a power of two from 64 KiB to 64 MiB, not 1024000 bytes"),
        (["migrate", "0", "--to", "/x", "--chunk-size", "128M"], 1, "chunk size must be"),
        (["migrate", "0", "--to", "/x", "--speed", "0"], 1,
         "speed must be more than 0 bytes/s (leave it out for no limit)"),
        (["speed", "0", "0"], 1, "speed must be more than 0 bytes/s"),
        # not truncated at the data plane's 64 bits (to 1 B/s)
        (["speed", "0", "18446744073709551617"], 1,
         "speed must be at most 9223372036854775807 bytes/s, not 18446744073709551617"),
        (["migrate", "0", "--to", "/x", "--speed", "18446744073709551616"], 1,
         "speed must be at most"),
        (["migrate", "0", "--to", "/x", "--dest-timeout", "0"], 1,
         "the destination timeout must be from 0.1 to 3600.0 seconds, not 0.0"),
        (["speed", "0", "lots"], 1, "not a speed: 'lots'"),
        (["status", "x"], 2, "'x' is not a ublk device"),
        (["cutover"], 2, "Missing argument 'DEVICE'"),
        (["cancel", "/dev/sda"], 2, "is not a ublk device"),
    ],
)  # fmt: skip
def test_bad_arguments(
    run_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, message: str
) -> None:
    rc, out, err = call_main(capsys, *argv)
    assert rc == status and out == ""
    assert message in one_error_line(err)


def test_migrate_sends_what_was_asked(
    run_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: Any
) -> None:
    got: list[dict[str, Any]] = []

    async def migrate(args: dict[str, Any]) -> dict[str, Any]:
        got.append(args)
        return {"migration": {"device": "/dev/ublkb3", "dest": args["to"], "mode": args["mode"],
                              "chunk_size": args["chunk_size"]}}  # fmt: skip

    monkeypatch.chdir(tmp_path)
    with serving(control.socket_path(3), {"migrate": migrate}):
        rc, out, err = call_main(capsys, "migrate", "/dev/ublkb3", "--to", "rel.img")
        assert rc == 0, err
        assert out == f"migrating /dev/ublkb3 to {tmp_path}/rel.img (auto, chunks of 1 MiB)\n"
        rc, out, err = call_main(
            capsys, "migrate", "3", "--to", "/d.img", "--mode", "snapshot", "--chunk-size",
            "4M", "--speed", "100M/s", "--no-cutover", "--verify", "--no-yield",
            "--dest-timeout", "5",
        )  # fmt: skip
        assert rc == 0, err
        assert (
            out == "migrating /dev/ublkb3 to /d.img (snapshot, chunks of 4 MiB, at most "
            "100 MiB/s)\n"
        )
        # an NBD export's URI goes as it is (not made a path)
        uri = "nbd+unix:///disk?socket=/run/x.sock"
        rc, out, err = call_main(capsys, "migrate", "3", "--to", uri)
        assert rc == 0 and out == f"migrating /dev/ublkb3 to {uri} (auto, chunks of 1 MiB)\n"
    assert got == [
        {"to": f"{tmp_path}/rel.img", "mode": "auto", "chunk_size": 1 << 20, "speed": None,
         "no_cutover": False, "verify": False, "fallback_wait_ms": 20.0, "dest_timeout": 30.0,
         "yield": True},
        {"to": "/d.img", "mode": "snapshot", "chunk_size": 4 << 20, "speed": 100 << 20,
         "no_cutover": True, "verify": True, "fallback_wait_ms": 20.0, "dest_timeout": 5.0,
         "yield": False},
        {"to": uri, "mode": "auto", "chunk_size": 1 << 20, "speed": None,
         "no_cutover": False, "verify": False, "fallback_wait_ms": 20.0, "dest_timeout": 30.0,
         "yield": True},
    ]  # fmt: skip
    assert daemon.parse_migrate_args({"to": uri}).dest == uri
    assert daemon.parse_migrate_args({"to": uri, "dest_timeout": 2}).dest_timeout == 2.0
    assert daemon.parse_migrate_args({"to": uri}).native_config("/i.img").dest_timeout_ms == 30000
    # the copier yields to guest I/O unless told not to
    assert daemon.parse_migrate_args({"to": uri}).busy_depth == 1
    assert daemon.parse_migrate_args({"to": uri, "yield": False}).busy_depth == 0
    assert daemon.parse_migrate_args({"to": "/d.img"}).dest == Path("/d.img")


def test_speed_command(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got: list[Any] = []

    async def speed(args: dict[str, Any]) -> dict[str, Any]:
        got.append(args["speed"])
        return {"migration": {}}

    with serving(control.socket_path(3), {"speed": speed}):
        assert call_main(capsys, "speed", "3", "50M")[1] == (
            "speed of /dev/ublkb3's migration: 50 MiB/s\n"
        )
        assert call_main(capsys, "speed", "3", "unlimited")[1] == (
            "speed of /dev/ublkb3's migration: unlimited\n"
        )
    assert got == [50 << 20, None]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = call_main(capsys, "--help")
    for cmd in ("migrate", "status", "cutover", "cancel", "speed"):
        assert cmd in out
    rc, out, _ = call_main(capsys, "migrate", "--help")
    flat = " ".join(out.split())
    assert rc == 0
    assert "[default: auto]" in flat and "[default: 1M]" in flat and "--fallback-wait MS" in flat
    assert "this adds a pause: no mode has one otherwise" in flat
    assert "--no-cutover" in flat and "--wait" in flat and "--speed BYTES/S" in flat


def test_status_text() -> None:
    base = {"id": 1, "path": "/dev/ublkb1", "image": "/a.img", "size": 1 << 30,
            "state": "running", "stats": {"reads": 5, "writes": 6, "parked": 0}}  # fmt: skip
    assert _status_lines({**base, "migration": None}) == [
        "/dev/ublkb1  /a.img  1 GiB  running",
        "no migration",
        "guest I/O      reads 5, writes 6, parked 0",
    ]
    mig = {
        "device": "/dev/ublkb1", "source": "/a.img", "dest": "/b.img", "mode": "snapshot",
        "phase": "folding", "pass": 3, "pass_kind": "all", "cursor": 512 << 20,
        "chunk_size": 1 << 20, "size": 1 << 30, "chunks": 1024, "chunks_copied": 1000,
        "bytes_copied": 900 << 20, "bytes_skipped": 100 << 20, "bytes_to_copy": 40 << 20,
        "dirty_chunks": 16, "hot_chunks": 0, "generation": 3, "delta_chunks": 9,
        "mirrored_writes": 0, "tracked_writes": 77, "parked": 2, "paused": False,
        "rate": 100 << 20, "eta_seconds": 0.4, "elapsed": 12.5, "speed": None,
        "verify_mismatches": None, "max_latency_ms": 3.25, "cutover_stall_ms": None,
        "final_pause_ms": None, "error": None, "io": {"reads": 9, "writes": 8},
        "busy_depth": 1, "yielded_seconds": 2.5, "ahead_writes": 5,
        "guest_waits": {"chunk": 0.0042, "destination": 0.0, "pause": 1.5},
    }  # fmt: skip
    lines = _status_lines({**base, "migration": mig})
    assert lines == [
        "/dev/ublkb1  /a.img  1 GiB  running",
        "migration      snapshot to /b.img: folding, pass 3 (all)",
        "progress       96.1%: 984 MiB of 1 GiB, 16 dirty, delta 3: 9 chunks, 100 MiB/s, "
        "ETA 400 ms",
        "copied         900 MiB written, 100 MiB skipped (holes, zeroes), 40 MiB to copy; "
        "cursor 512 MiB",
        "chunks         1000 of 1024 copied (1 MiB each), 16 dirty, 0 hot",
        "delta          generation 3, 9 chunks",
        "rate           100 MiB/s (limit unlimited; yielded to guest I/O for 2.5 s), ETA "
        "400 ms, elapsed 12.5 s",
        "guest writes   0 mirrored, 77 tracked, 5 ahead of the copier, 2 parked; longest I/O "
        "3.2 ms",
        "guest waited   4.2 ms on chunks being copied, 0 ms for the destination, 1.5 s paused "
        "(all requests together)",
        "guest I/O      reads 9, writes 8",
    ]
    lost = {**mig, "phase": "reconnecting", "dest_down": 2, "reconnects": 1}
    assert "destination    2 connections lost now, reconnected 1 times" in _status_lines(
        {**base, "migration": lost}
    )
    eager = {**mig, "busy_depth": 0, "yielded_seconds": 0}
    assert "rate           100 MiB/s (limit unlimited; not yielding to guest I/O), ETA 400 ms, " \
        "elapsed 12.5 s" in _status_lines({**base, "migration": eager})
    failed = {**mig, "phase": "failed", "error": "the destination failed: EIO"}
    assert "error          the destination failed: EIO" in _status_lines(
        {**base, "migration": failed}
    )


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [("100M", 100 << 20), ("100M/s", 100 << 20), ("1.5G/s", 3 << 29), ("64MiB/s", 64 << 20),
     ("4096", 4096), (" 10 K/S ", 10 << 10), ("1MB/s", 10**6)],
)  # fmt: skip
def test_parse_rate(text: str, n: int) -> None:
    assert parse_rate(text) == n


@pytest.mark.parametrize("text", ["", "/s", "fast", "1X/s", "-5M", "5M/h"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(UserError, match="not a speed"):
        parse_rate(text)


@given(n=st.integers(0, 10**6), prefix=st.sampled_from(["", "K", "M", "G", "T"]),
       suffix=st.sampled_from(["", "i", "iB"]), per=st.sampled_from(["", "/s", "/S"]))  # fmt: skip
def test_rate_is_a_size_per_second(n: int, prefix: str, suffix: str, per: str) -> None:
    text = f"{n}{prefix}{suffix if prefix else ''}{per}"
    assert parse_rate(text) == parse_size(f"{n}{prefix}{suffix if prefix else ''}")
    assert parse_rate(text) == n * 1024 ** ["", "K", "M", "G", "T"].index(prefix)


@given(k=st.integers(1, 1023), power=st.integers(0, 4))
def test_format_rate_round_trips(k: int, power: int) -> None:
    n = k * 1024**power
    text = format_rate(n)
    assert text.endswith("/s") and text.removesuffix("/s") == format_size(n)
    assert parse_rate(text.replace(" ", "")) == n


@given(st.floats(0, 10**6, allow_nan=False))
def test_format_duration_is_monotonic_in_unit(seconds: float) -> None:
    text = format_duration(seconds)
    if seconds < 1:
        assert text.endswith(" ms")
    elif seconds < 59.5:
        assert text.endswith(" s")
    else:
        assert text[-1] in "sm" and ("m" in text or "h" in text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 ms"), (0.0042, "4.2 ms"), (0.5, "500 ms"), (3.25, "3.2 s"), (10, "10 s"),
     (75, "1m15s"), (3725, "1h02m")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
