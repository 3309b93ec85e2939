"""The migration's numbers for issue 3's closing note, measured in one boot of a kernel VM.

Not a test.  Run::

    .venv/bin/python -m ublkmig.vm run --kernel unstable -- \\
        .venv/bin/python tests/vm/migration_numbers.py

(a) the migration time of an idle disk full of random data, per mode, against ``dd`` of
    the same image with the same block size (the chunk size) to another file;
(b) guest 4k random-write IOPS during the migration (fio at full speed, running through the
    whole migration) as a fraction of the same workload without one, per mode, from the
    daemon's write counter over the migration's window and over a window without; on a
    256 MiB disk full of data, fio writing at random over its first 64 MiB (a hot set: with
    writes all over the disk, snapshot mode's deltas, kept to the end, would need several
    times the disk's size beside the source, more than the VM's memory);
(c) the cutover stall (mirror) and the final pause (dbt, snapshot), idle and under load.

The idle disk of (a) is 1 GiB if the VM has room for a source and a destination of that
size in memory (``run --memory 4G``), else 512 MiB (the 2 GiB default); the table says
which.
Everything sits on a tmpfs; timings under emulation only mean something as ratios.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmlib import MODES, ServeFactory, device_status, run_cli, run_ok

MiB = 1 << 20
GiB = 1 << 30
CHUNK = "1M"
FIO_DEPTH = 32
LOAD_SIZE = 256 * MiB  # (b)'s disk
FIO_SPAN = 64 * MiB  # (b)'s fio writes over [0, FIO_SPAN)
BASELINE_SECONDS = 12.0
MNT = Path("/run/ubm-numbers")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def say(text: str) -> None:
    print(text, flush=True)


def dd_seconds(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    run_ok("dd", f"if={src}", f"of={dst}", f"bs={CHUNK}", "status=none")
    took = time.monotonic() - t0
    dst.unlink()
    return took


def set_scheduler_none(device: str) -> None:
    sched = Path(f"/sys/block/{Path(device).name}/queue/scheduler")
    if sched.exists():
        sched.write_text("none")


def migrate(device: str, dest: Path, mode: str) -> dict[str, Any]:
    r = run_cli("migrate", device, "--to", str(dest), "--mode", mode, "--chunk-size", CHUNK,
                "--wait", timeout=1800)
    assert r.returncode == 0, f"migrate {mode} failed: {r.stdout}\n{r.stderr}"
    mig = device_status(device)["migration"]
    assert mig["phase"] == "completed", mig
    return dict(mig)


def start_fio(device: str, cwd: Path) -> subprocess.Popen[bytes]:
    """4k random writes at full speed (no rate limit) until SIGINT."""
    return subprocess.Popen(
        ["fio", "--name=iops", f"--filename={device}", "--rw=randwrite", "--bs=4k",
         f"--iodepth={FIO_DEPTH}", "--ioengine=io_uring", "--direct=1", f"--size={FIO_SPAN}",
         "--time_based",
         "--runtime=3600", "--norandommap", "--randrepeat=0", "--output-format=json",
         f"--output={cwd / 'fio.json'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)


def stop_fio(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("fio did not stop") from None
    # fio exits non-zero when interrupted; an I/O error shows in its output
    text = err.decode(errors="replace")
    assert "error" not in text.lower(), f"fio failed (rc {proc.returncode}): {text}"


def writes(device: str) -> tuple[float, int]:
    return time.monotonic(), int(device_status(device)["stats"]["writes"])


def wait_writes_start(device: str) -> None:
    t0, w0 = writes(device)
    while writes(device)[1] - w0 < 1000:
        assert time.monotonic() - t0 < 60, "fio does not write"
        time.sleep(0.1)


def baseline_iops(serve: ServeFactory, image: Path, work: Path) -> float:
    dev = serve(image)
    set_scheduler_none(dev.device)
    fio = start_fio(dev.device, work)
    try:
        wait_writes_start(dev.device)
        time.sleep(1.0)
        t0, w0 = writes(dev.device)
        time.sleep(BASELINE_SECONDS)
        t1, w1 = writes(dev.device)
    finally:
        stop_fio(fio)
    dev.stop()
    return (w1 - w0) / (t1 - t0)


def loaded_migration(serve: ServeFactory, image: Path, dest: Path, mode: str,
                     work: Path) -> tuple[float, dict[str, Any]]:
    """IOPS over the migration's window with fio writing throughout, and its status."""
    dev = serve(image)
    set_scheduler_none(dev.device)
    fio = start_fio(dev.device, work)
    try:
        wait_writes_start(dev.device)
        time.sleep(1.0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ublkmig", "migrate", dev.device, "--to", str(dest),
             "--mode", mode, "--chunk-size", CHUNK],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, int, str | None]] = []
        while True:
            st = device_status(dev.device)
            phase = st["migration"]["phase"] if st["migration"] else None
            samples.append((time.monotonic(), int(st["stats"]["writes"]), phase))
            if phase in ("completed", "cancelled", "failed"):
                break
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"migrate failed: {out}\n{err}"
        time.sleep(1.0)  # fio goes on after the cutover
    finally:
        stop_fio(fio)
    mig = device_status(dev.device)["migration"]
    assert mig["phase"] == "completed", mig
    dev.stop()
    dest.unlink()
    # the window: the first sample that saw the migration to the first that saw it ended
    first = next(s for s in samples if s[2] is not None)
    last = samples[-1]
    iops = (last[1] - first[1]) / (last[0] - first[0])
    return iops, dict(mig)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def main() -> int:
    if os.geteuid() != 0 or not Path("/dev/ublk-control").exists():
        subprocess.run(["modprobe", "ublk_drv"], capture_output=True)
    size = GiB if mem_available() > 3 * GiB else 512 * MiB
    MNT.mkdir(exist_ok=True)
    run_ok("mount", "-t", "tmpfs", "-o", f"size={2 * size + 256 * MiB}", "tmpfs", str(MNT))
    work = Path(tempfile.mkdtemp(dir=MNT))
    serve = ServeFactory(work / "serve")
    try:
        release = os.uname().release
        feats = json.loads(run_cli("features", "--json").stdout)
        image = work / "disk.img"
        dest = work / "dest.img"
        say(f"(a) {size // MiB} MiB of random data on a tmpfs, Linux {release}, "
            f"data path {feats.get('data_path', '?')}")
        run_ok("dd", "if=/dev/urandom", f"of={image}", "bs=4M", f"count={size // (4 * MiB)}",
               "status=none")

        # (a) idle: dd before, between and after the modes (the best dd counts)
        dd = [dd_seconds(image, dest)]
        idle: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            dev = serve(image)
            idle[mode] = migrate(dev.device, dest, mode)
            dev.stop()
            dest.unlink()
            say(f"idle {mode}: {idle[mode]['elapsed']:.2f} s")
            dd.append(dd_seconds(image, dest))
        dd_s = min(dd)
        say(f"dd bs={CHUNK}: {', '.join(f'{d:.2f} s' for d in dd)}")
        image.unlink()

        # (b) under load
        say(f"(b) {LOAD_SIZE // MiB} MiB of random data, fio on its first {FIO_SPAN // MiB} MiB")
        run_ok("dd", "if=/dev/urandom", f"of={image}", "bs=4M",
               f"count={LOAD_SIZE // (4 * MiB)}", "status=none")
        bases = [baseline_iops(serve, image, work)]
        say(f"fio alone: {bases[-1]:.0f} IOPS")
        loaded: dict[str, tuple[float, dict[str, Any]]] = {}
        for mode in MODES:
            loaded[mode] = loaded_migration(serve, image, dest, mode, work)
            say(f"fio during {mode}: {loaded[mode][0]:.0f} IOPS, "
                f"migration {loaded[mode][1]['elapsed']:.2f} s")
        bases.append(baseline_iops(serve, image, work))
        say(f"fio alone again: {bases[-1]:.0f} IOPS")
        base = sum(bases) / len(bases)
    finally:
        serve.teardown()
        subprocess.run(["umount", str(MNT)], capture_output=True)

    say("")
    say(f"Migration numbers: Linux {release}, data path {feats.get('data_path', '?')}, "
        f"images of random data on tmpfs, chunk {CHUNK}, TCG emulation, 2 vCPUs")
    say("")
    say(f"(a) idle {size // MiB} MiB disk: migration time (the daemon's) vs dd of the same "
        f"image (bs = chunk size; best of {len(dd)})")
    say(f"| mode     | migration | dd bs={CHUNK} | ratio |")
    say("|----------|-----------|----------|-------|")
    for mode in MODES:
        e = idle[mode]["elapsed"]
        say(f"| {mode:<8} | {e:>7.2f} s | {dd_s:>6.2f} s | {e / dd_s:>5.2f} |")
    say("")
    say(f"(b) guest 4k random writes (fio io_uring QD{FIO_DEPTH}, direct, no rate limit, over "
        f"the first {FIO_SPAN // MiB} MiB of a {LOAD_SIZE // MiB} MiB disk) during the "
        f"migration; alone: {base:.0f} IOPS (mean of {', '.join(f'{b:.0f}' for b in bases)})")
    say("| mode     | IOPS during | fraction | migration under load |")
    say("|----------|-------------|----------|----------------------|")
    for mode in MODES:
        iops, mig = loaded[mode]
        say(f"| {mode:<8} | {iops:>11.0f} | {iops / base:>8.2f} | {mig['elapsed']:>18.2f} s |")
    say("")
    say("(c) switch-over: idle / under load")
    say("| mode     | cutover stall      | final pause        | longest guest I/O (load) |")
    say("|----------|--------------------|--------------------|--------------------------|")
    for mode in MODES:
        i, m = idle[mode], loaded[mode][1]
        stall = f"{ms(i['cutover_stall_ms'])} / {ms(m['cutover_stall_ms'])}"
        pause = f"{ms(i['final_pause_ms'])} / {ms(m['final_pause_ms'])}"
        say(f"| {mode:<8} | {stall:<18} | {pause:<18} | {ms(m['max_latency_ms']):>24} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
