"""The benchmark harness's own parts, on this host: fio command lines and their parsing
(real fio on a temporary file), the windows a migration run is cut into, the report."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from ublkmig.bench import fio, report, scenarios, targets
from ublkmig.bench.fio import FioJob

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


def test_job_argv_is_reproducible(tmp_path: Path) -> None:
    job = FioJob("j", "randwrite", "4k", 32, numjobs=2, runtime=3, ramp=1, size=1 << 20,
                 rate_iops=500, lat_log=True)  # fmt: skip
    argv = job.argv("/dev/x", tmp_path)
    assert argv == job.argv("/dev/x", tmp_path)
    for want in ("--randrepeat=1", f"--randseed={fio.SEED}", "--ramp_time=1s", "--runtime=3s",
                 "--numjobs=2", "--rate_iops=500", "--size=1048576", "--direct=1",
                 "--log_unix_epoch=1", f"--write_lat_log={tmp_path / 'j'}"):  # fmt: skip
        assert want in argv


@needs_fio
def test_run_and_parse_real_fio(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"\0" * (4 << 20))
    job = FioJob("rw", "randrw", "4k", 4, runtime=1, ramp=0, rwmixread=50)
    try:
        r = fio.run(job, str(target), tmp_path)
    except fio.FioError as e:
        if "O_DIRECT" in str(e) or "Invalid argument" in str(e):
            pytest.skip(f"this filesystem has no O_DIRECT: {e}")
        raise
    assert r.read["iops"] > 0 and r.write["iops"] > 0
    assert r.iops == pytest.approx(r.read["iops"] + r.write["iops"])
    assert r.ios > 0 and 0.5 < r.seconds < 5
    for d in (r.read, r.write):
        assert 0 < d["lat_p50_us"] <= d["lat_p99_us"] <= d["lat_p99.9_us"] <= d["lat_max_us"]
    assert r.argv[0] == "fio"


@needs_fio
def test_loaded_logs_every_io_on_the_callers_clock(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"\0" * (4 << 20))
    job = FioJob("load", "randwrite", "4k", 4, runtime=3600, ramp=0, size=4 << 20,
                 rate_iops=200, lat_log=True)  # fmt: skip
    try:
        with scenarios.loaded(job, str(target), tmp_path) as f:
            time.sleep(1.5)
    except fio.FioError as e:
        if "Invalid argument" in str(e):
            pytest.skip(f"this filesystem has no O_DIRECT: {e}")
        raise
    s = f["samples"]
    assert 100 < len(s) < 600, len(s)  # 200 IOPS for about 1.5 s
    assert all(w for _, _, w in s)
    assert -0.5 < s[0][0] < 1.0 and s[-1][0] < 3.0, (s[0], s[-1])
    w = scenarios.windows(s, {"all": (0.0, 1.5)})["all"]
    assert 100 < w["iops"] < 300 and w["lat_p50_ms"] > 0


def test_windows_and_series() -> None:
    # 1000 I/Os over [0, 1): latency 1..1000 us, every other one a write
    samples = [(i / 1000, float(i + 1), i % 2 == 1) for i in range(1000)]
    w = scenarios.windows(samples, {"a": (0.0, 0.5), "b": (0.5, 1.0), "none": (2.0, 3.0)})
    assert w["a"]["iops"] == pytest.approx(1000) and w["b"]["iops"] == pytest.approx(1000)
    assert w["none"] == {"iops": 0.0}
    # the request time: every I/O's latency in the window added up (1..500 us in [0, 0.5))
    assert w["a"]["request_seconds"] == pytest.approx(sum(range(1, 501)) / 1e6)
    # writes in [0.5, 1): latencies 502, 504, ..., 1000 us
    assert w["b"]["lat_max_ms"] == pytest.approx(1.0) and w["b"]["writes"] == 250
    assert w["b"]["lat_p50_ms"] == pytest.approx(0.752)
    # the daemon's CPU per I/O: 0.01 s over the 500 I/Os before, 0.05 s over the 250 during
    cpu = scenarios.cpu_per_io(samples, [(0.0, 1.0), (0.5, 1.01), (0.75, 1.06)])
    assert cpu == {"before": pytest.approx(20.0), "during": pytest.approx(200.0)}
    series = scenarios.series(samples, 0.25)
    assert [round(t, 2) for t, _, _ in series] == [0.0, 0.25, 0.5, 0.75]
    assert all(iops == pytest.approx(1000) for _, iops, _ in series)


def test_written_per_guest_byte() -> None:
    """The daemon's writes to storage per byte the guest wrote during the migration."""
    from ublkmig.bench.scenarios.under_load import written_per_guest_byte

    job = FioJob("w", "randwrite", "4k", 32)
    during = {"iops": 1.0, "writes": 1000}
    # mirror: 1000 guest writes of 4 KiB, 500 of them mirrored, 8 MiB copied
    mig = {"mirrored_writes": 500, "bytes_copied": 8 << 20, "cow_chunks": 0,
           "chunk_size": 1 << 20}  # fmt: skip
    assert written_per_guest_byte(job, during, mig) == pytest.approx(
        (4096000 + 500 * 4096 + (8 << 20)) / 4096000)
    # snapshot: 3 chunks copied on write into its delta as well
    assert written_per_guest_byte(job, during, {**mig, "cow_chunks": 3}) == pytest.approx(
        (4096000 + 500 * 4096 + (11 << 20)) / 4096000)
    # no writes in the window, or a migration that does not count them (QEMU's): not known
    assert written_per_guest_byte(job, {"iops": 0.0}, mig) is None
    assert written_per_guest_byte(job, during, {"bytes_copied": 1}) is None


def _results() -> dict:
    row = {"job": "randread-4k-qd32-q1", "queues": 1, "mbps": 1.0, "lat_mean_us": 10.0,
           "lat_p99_us": 20.0, "lat_p99.9_us": 30.0, "fio": [["fio", "--name=x"]]}  # fmt: skip
    return {
        "command": "ublkmig bench --quick", "quick": True, "started": "now", "seconds": 1.0,
        "settings": {"reps": 1},
        "environment": {"cpu": "cpu", "cpus": 2, "memory_gib": 2.0, "kernel": "7.2",
                        "where": "in the kernel VM", "data_path": "auto-zc", "emulated": True},
        "scenarios": {"datapath": {"rows": [
            {**row, "target": "raw file", "kind": "raw file",
             "iops": {"median": 100.0, "min": 90.0, "max": 110.0, "n": 1},
             "server_cpu_us_per_io": None},
            {**row, "target": "ublkmig auto-zc", "kind": "ublkmig",
             "iops": {"median": 90.0, "min": 90.0, "max": 90.0, "n": 1},
             "server_cpu_us_per_io": 5.0, "server_peak_rss": 40 << 20},
            {**row, "target": "kublk auto-zc", "kind": "kublk auto-zc",
             "iops": {"median": 95.0, "min": 95.0, "max": 95.0, "n": 1},
             "server_cpu_us_per_io": 4.0},
        ]}},
    }  # fmt: skip


def test_report_sets_ublkmig_against_raw_and_kublk(tmp_path: Path) -> None:
    md = report.write(_results(), tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.md").read_text() == md
    assert "| ublkmig auto-zc | 90 (90–90) |" in md and "| 0.90 |" in md  # vs raw
    assert "| 5.0 | 40 | 0.90 |" in md  # CPU per I/O, peak RSS in MiB
    assert "| 4.0 | - | 0.95 |" in md  # (not measured)
    assert "ublkmig / kublk auto-zc (kublk's best): 0.95" in md
    assert "emulation" in md


def _load_rep(seconds: float, before: float, during: float, pause: float | None) -> dict:
    win = {"iops": 0.0, "lat_p50_ms": 1.0, "lat_p99_ms": 2.0, "lat_p99.9_ms": 3.0,
           "lat_max_ms": 4.0}  # fmt: skip
    return {"job": "randwrite-4k-qd32", "mode": "dbt", "fio": ["fio"], "seconds": seconds,
            "windows": {"before": {**win, "iops": before},
                        "during": {**win, "iops": during, "request_seconds": 2.0},
                        "after": {**win, "iops": before}},
            "guest_waits": {"chunk": 0.2, "destination": 0.8 * seconds / 3, "pause": 0.0},
            "cpu_us_per_io": {"before": 30.0, "during": 10.0 * seconds},
            "bytes_copied": 10, "passes": 3, "cutover_stall_ms": None, "final_pause_ms": pause,
            "converged": True, "events": [(0.0, "start")], "series": [(0.0, 1.0, 2.0)]}  # fmt: skip


def test_load_repetitions_combine_into_medians_with_spread(tmp_path: Path) -> None:
    run = scenarios.combine([_load_rep(2.0, 100, 50, 10.0), _load_rep(4.0, 100, 80, 30.0),
                             _load_rep(3.0, 100, 60, 20.0)])  # fmt: skip
    assert run["reps"] == 3 and run["seconds"] == 3.0
    assert run["seconds_spread"] == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 3}
    assert run["during_vs_before"]["median"] == pytest.approx(0.6)
    assert run["windows"]["during"]["iops"] == 60 and run["final_pause_ms"] == 20.0
    r = {**_results(), "scenarios": {"load": {"size": 256 << 20, "span": 64 << 20,
                                               "runs": [run]}}}  # fmt: skip
    md = report.write(r, tmp_path)
    assert "| randwrite-4k-qd32 | dbt | 3.00 (2.00–4.00) | 100 / 60 / 100 | 0.60 (0.50–0.80) |" \
        in md  # fmt: skip
    # where the guest waited, as shares of its request time (medians: 0.2, 0.8, 0 of 2 s);
    # no RSS in these repetitions
    assert "| 20.0 ms | 10% / 40% / 0% | 30 / 30 | - | - |" in md
    md = report.write({**r, "scenarios": {"load": {**r["scenarios"]["load"], "runs": [
        {**run, "written_per_guest_byte": 2.345}]}}}, tmp_path)  # fmt: skip
    assert "| 30 / 30 | 2.35 | - |" in md  # written per guest byte, then the RSS
    assert (tmp_path / run["plot"]).stat().st_size > 1000  # the PNG
    # the same load on a larger disk (the large scenario): its section, its idle migrations,
    # its plots, and both in the goals table
    r["scenarios"]["large"] = {"size": 1 << 30, "span": 64 << 20, "runs": [run],
                               "idle_seconds": {"mirror": 1.5, "dbt": 1.25}}  # fmt: skip
    md = report.write(r, tmp_path)
    assert "fio on the first 64 MiB of a 1024 MiB disk" in md.split("larger disk")[1]
    assert "The same disk migrated idle, in the same boot (seconds, medians): mirror 1.50, " \
        "dbt 1.25." in md  # fmt: skip
    assert "| randwrite-4k-qd32, 256 MiB disk | dbt | 0.60" in md
    assert "| randwrite-4k-qd32, 1024 MiB disk | dbt | 0.60" in md
    assert (tmp_path / "load-randwrite-4k-qd32-dbt.png").exists()
    assert (tmp_path / "large-randwrite-4k-qd32-dbt.png").exists()
    # the slow destination's section: the same table, and the fallbacks
    auto = {**run, "mode": "auto", "fallbacks": 2}
    r["scenarios"] = {"slow": {"size": 256 << 20, "span": 64 << 20, "write_delay_ms": 40,
                               "runs": [{**run, "mode": "mirror", "fallbacks": 0}, auto]}}
    md = report.write(r, tmp_path)
    assert "## 4. A slow destination: mirror against auto" in md
    assert "| randwrite-4k-qd32 | auto | 3.00 (2.00–4.00) |" in md
    assert "Every write to the destination waits 40 ms" in md and "mirror 0, auto 2." in md
    assert (tmp_path / "slow-randwrite-4k-qd32-auto.png").exists()
    # yielding against not: the same table, and the time held back
    r["scenarios"] = {"yield": {"size": 256 << 20, "span": 64 << 20, "runs": [
        {**run, "mode": "mirror, yielding", "yielded_seconds": 1.5},
        {**run, "mode": "mirror, not yielding", "yielded_seconds": 0.0}]}}  # fmt: skip
    md = report.write(r, tmp_path)
    assert "## 5. The copier yielding to guest I/O" in md
    assert "| randwrite-4k-qd32 | mirror, not yielding | 3.00 (2.00–4.00) |" in md
    assert "mirror, yielding 1.50, mirror, not yielding 0.00." in md
    assert (tmp_path / "yield-randwrite-4k-qd32-mirror-yielding.png").exists()


def test_ab_rows_and_their_medians() -> None:
    """ublkmig.bench.ab: a load run as a row (ratio, waits as shares of the request time, CPU),
    and the medians per load, mode and build."""
    from ublkmig.bench import ab

    runs = [_load_rep(s, 100, d, p) for s, d, p in ((2.0, 50, 10.0), (4.0, 80, 30.0),
                                                   (3.0, 60, 20.0))]  # fmt: skip
    rows = [ab.row("new", r) for r in runs] + [ab.row("old", runs[0])]
    assert rows[0]["ratio"] == pytest.approx(0.5) and rows[0]["pause_ms"] == 10.0
    assert rows[0]["waited_chunk"] == pytest.approx(0.1)  # 0.2 s of 2 s of requests
    assert rows[1]["cpu_us_during"] == 40.0
    md = ab.table(rows)
    assert "| randwrite-4k-qd32 | dbt | new | 3 | 0.60 | 3.0 | 2.0 / 2.0 | 20 (-) | 10 / 40 / 0 " \
        "| 30 / 30 |" in md  # fmt: skip
    assert "| randwrite-4k-qd32 | dbt | old | 1 | 0.50 | 2.0 |" in md


@pytest.mark.parametrize("mode", [*scenarios.MODES, "auto"])
def test_migrate_request_is_one_the_daemon_takes(mode: str, tmp_path: Path) -> None:
    from ublkmig import daemon

    opts = daemon.parse_migrate_args(scenarios.migrate_request(tmp_path / "d.img", mode).args())
    assert str(opts.mode) == mode and opts.chunk_size == scenarios.CHUNK_BYTES
    assert opts.speed is None and not opts.no_cutover and not opts.verify
    assert opts.busy_depth > 0  # the copier yields, as it does by default
    eager = scenarios.migrate_request(tmp_path / "d.img", mode, yields=False).args()
    assert daemon.parse_migrate_args(eager).busy_depth == 0


def test_the_harness_watches_every_window_alike(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watch() asks for the status as often as follow() does during a migration (the
    observer's cost, the same in each window), and for as long as it is told."""
    from support.control_fakes import serving

    from ublkmig import control

    asked: list[float] = []

    async def status(args: dict[str, object]) -> dict[str, object]:
        asked.append(time.monotonic())
        return {"migration": None}

    monkeypatch.setattr(scenarios.common, "WATCH_INTERVAL", 0.1)
    with serving(control.socket_path(7), {"status": status}):
        t0 = time.monotonic()
        scenarios.watch("/dev/ublkb7", 1.0)
        took = time.monotonic() - t0
    assert 1.0 <= took < 1.5
    assert 8 <= len(asked) <= 12, asked
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert min(gaps) >= 0.09  # never faster than follow()'s interval


def test_check_same_names_the_first_difference(tmp_path: Path) -> None:
    data = os.urandom(9 << 20)  # more than one comparison's 4 MiB
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(data)
    b.write_bytes(data)
    scenarios.check_same(str(a), b, len(data))
    bad = bytearray(data)
    bad[5_000_001] ^= 1
    b.write_bytes(bad)
    with pytest.raises(scenarios.IntegrityError, match="first at byte 5000001"):
        scenarios.check_same(str(a), b, len(data))
    b.write_bytes(data[: 8 << 20])
    with pytest.raises(scenarios.IntegrityError, match="ended 1048576 bytes early"):
        scenarios.check_same(str(a), b, len(data))


def test_peak_rss_is_the_servers_high_water_mark() -> None:
    me = targets.Target("this test", "", os.getpid())
    blob = b"x" * (64 << 20)  # written: resident
    peak = me.peak_rss()
    assert peak is not None and peak > len(blob)
    del blob
    assert targets.Target("raw file", "/x.img").peak_rss() is None


def test_load_runs_every_mode_once_per_repetition_none_always_first() -> None:
    from ublkmig.bench.scenarios.load import run_order

    modes = ("auto", "mirror", "dbt", "snapshot")
    order = run_order(modes, 3)
    assert [order[i:i + 4] for i in (0, 4, 8)] == [
        ["auto", "mirror", "dbt", "snapshot"], ["mirror", "dbt", "snapshot", "auto"],
        ["dbt", "snapshot", "auto", "mirror"]]
    assert run_order(modes, 1) == list(modes)  # (a quick run: as before)


def test_targets_judge_each_load_run() -> None:
    """The goals table: each unthrottled and 2000 IOPS run of the load and large scenarios
    with its verdicts, a migration's time against its own scenario's idle migrations."""
    def run(job: str, mode: str, share: float, p99: tuple[float, float], seconds: float,
            **kw: object) -> dict:  # fmt: skip
        return {"job": job, "mode": mode, "seconds": seconds, "converged": True,
                "during_vs_before": {"median": share},
                "windows": {"before": {"lat_p99_ms": p99[0]}, "during": {"lat_p99_ms": p99[1]}},
                "final_pause_ms": None, "cutover_pause_ms": 0.0, **kw}  # fmt: skip

    steady = "randwrite-4k-qd32-2000iops"
    sc = {"load": {"size": 256 << 20, "runs": [
              run("randwrite-4k-qd32", "auto", 0.55, (2.0, 8.0), 5.0),
              run("randwrite-4k-qd32", "dbt", 0.59, (2.0, 12.0), 5.0, final_pause_ms=40.0),
              # its tail mirrors: the cutover's pause is its pause
              run("randwrite-4k-qd32", "snapshot", 0.45, (2.0, 4.0), 5.0, cutover_pause_ms=0.2),
              run("randrw70-4k-qd32", "mirror", 0.1, (2.0, 50.0), 5.0),  # not judged
              run(steady, "mirror", 0.92, (2.0, 4.0), 7.0),  # no idle migrations measured
          ]},
          "large": {"size": 1 << 30, "idle_seconds": {"mirror": 10.0, "dbt": 8.0}, "runs": [
              run(steady, "dbt", 0.95, (2.0, 6.0), 30.0, final_pause_ms=60.0),
              run(steady, "auto", 0.9, (2.0, 5.0), 20.0, cutover_pause_ms=1.0),
          ]}}  # fmt: skip
    lines = report.targets_md(sc)
    rows = [ln for ln in lines if ln.startswith("| randwrite")]
    assert rows == [
        "| randwrite-4k-qd32, 256 MiB disk | auto | 0.55 ✓ | 4.0x ✓ | - | 0.0 ms ✓ |",
        "| randwrite-4k-qd32, 256 MiB disk | dbt | 0.59 ✗ | 6.0x ✗ | - | 40.0 ms ✓ |",
        "| randwrite-4k-qd32, 256 MiB disk | snapshot | 0.45 ✓ | 2.0x ✓ | - | 0.2 ms ✓ |",
        f"| {steady}, 256 MiB disk | mirror | 0.92 ✓ | 2.0x ✓ | - | 0.0 ms ✓ |",
        f"| {steady}, 1024 MiB disk | dbt | 0.95 ✓ | 3.0x ✓ | 3.8x ✗ | 60.0 ms ✗ |",
        # auto against mirror's idle time; a 1 ms cutover pause is not under 1 ms
        f"| {steady}, 1024 MiB disk | auto | 0.90 ✓ | 2.5x ✓ | 2.0x ✓ | 1.0 ms ✗ |",
    ]
    assert report.targets_md({}) == []


def test_wait_for_io_knows_block_devices_and_has_a_deadline(tmp_path: Path) -> None:
    from ublkmig.bench.scenarios.under_load import wait_for_io

    (tmp_path / "file").write_bytes(b"\0" * 4096)
    assert wait_for_io(str(tmp_path / "file"), time.time()) is None  # no counters to read
    devs = sorted(p.name for p in Path("/sys/class/block").glob("*"))
    if not devs:
        pytest.skip("no block device here")
    t0 = time.monotonic()
    with pytest.raises(fio.FioError, match="did not get"):
        wait_for_io(f"/dev/{devs[0]}", time.time(), ios=1 << 60, timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_docs_refuse_to_drop_a_section_with_no_kept_run(tmp_path: Path) -> None:
    """A page written before results.json was kept: a --docs run of one scenario would
    render that one alone and drop the rest, so it is refused up front, naming them."""
    from ublkmig.bench import run as bench_run
    from ublkmig.errors import UserError

    docs = tmp_path / "docs"
    (docs / "benchmarks").mkdir(parents=True)
    (docs / "BENCHMARKS.md").write_text("# b\n\n## 1. Data path (no migration)\n\nx\n\n"
                                        "## 3. Migration under load\n\ny\n\n"
                                        "## 5. The peer: QEMU's blockdev-mirror, same load\n")
    with pytest.raises(UserError) as e:
        bench_run.check_docs(("load",), docs=docs)
    assert "Data path (no migration); The peer: QEMU's blockdev-mirror" in str(e.value)
    assert "--scenario datapath --scenario qemu" in str(e.value), e.value
    bench_run.check_docs(("load", "datapath", "qemu"), docs=docs)
    (docs / "benchmarks" / "results.json").write_text(
        json.dumps({"scenarios": {"datapath": {}, "qemu": {}}, "runs": {}}))
    bench_run.check_docs(("load",), docs=docs)  # the others' runs are kept
    bench_run.check_docs(("idle",), docs=tmp_path / "none")  # no page yet


def test_docs_keep_each_sections_latest_run(tmp_path: Path) -> None:
    """bench --docs rewrites its scenarios' sections and keeps the others' latest run."""
    from ublkmig.bench import run as bench_run
    from ublkmig.errors import UserError

    docs = tmp_path / "docs"
    docs.mkdir()
    first = {**_results(), "command": "ublkmig bench --scenario datapath", "quick": False,
             "started": "day 1"}  # fmt: skip
    report.write(first, tmp_path / "one")
    bench_run.update_docs(tmp_path / "one", ("datapath",), docs=docs)
    md = (docs / "BENCHMARKS.md").read_text()
    assert "## 1. Data path" in md and "## 3." not in md
    assert "- datapath: `ublkmig bench --scenario datapath` (full settings), day 1" in md
    # a later run of the load scenario: both sections, each naming its run, and the plots
    run = scenarios.combine([_load_rep(2.0, 100, 50, 10.0)])
    second = {**first, "command": "ublkmig bench --scenario load", "started": "day 2",
              "scenarios": {"load": {"size": 256 << 20, "span": 64 << 20, "runs": [run]}}}
    report.write(second, tmp_path / "two")
    bench_run.update_docs(tmp_path / "two", ("load",), docs=docs)
    md = (docs / "BENCHMARKS.md").read_text()
    assert "## 1. Data path" in md and "## 3. Migration under load" in md
    assert "- datapath: `ublkmig bench --scenario datapath` (full settings), day 1" in md
    assert "- load: `ublkmig bench --scenario load` (full settings), day 2" in md
    assert "![](benchmarks/load-randwrite-4k-qd32-dbt.png)" in md
    assert (docs / "benchmarks" / "load-randwrite-4k-qd32-dbt.png").stat().st_size > 1000
    with pytest.raises(UserError, match="--docs"):
        bench_run.main(("load",), True, tmp_path / "x", False, "c", docs=True)
