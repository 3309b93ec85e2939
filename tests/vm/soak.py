"""The soak, outside CI (``ci/soak``): migrations one after another under fio's verify loop,
across the modes, to files and to NBD exports; in the rounds to a file the daemon is
SIGKILLed mid-way, a new one takes the device over (folding a snapshot's deltas back into
the image first) and ``migrate --resume`` finishes the job; in the rounds to NBD the server
(qemu-nbd) is SIGKILLed mid-way and started again a second later.  Every round ends with
fio verify and byte-for-byte comparisons of the device, the destination while served and
the destination once its daemon is gone.

Runs inside a kernel VM (``python -m ublkmig.vm run --kernel K -- .venv/bin/python
tests/vm/soak.py --rounds N``); prints one line per round and, last, ``soak-result: {json}``
with the counts.  Exit status 1 if any round lost data, saw a guest I/O error or failed.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # vmlib; support (tests/support)

from support.cli import UBLKMIG, run_cli  # noqa: E402 - after the path
from support.images import sparse_image  # noqa: E402
from vmlib import (  # noqa: E402 - after the path
    FioFailed,
    FioLoop,
    Served,
    assert_same_bytes,
    check_completed,
    cli_status,
    finish_migrate,
    pattern,
    sha256_of,
    start_migrate,
    start_serve,
    wait_migrate,
    wait_migration,
)

from ublkmig.bench.nbd_server import start_nbd_server  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
BUSY = (8 * MiB, 32 * MiB)  # fio's loop: (offset, length)
MODES = ("mirror", "dbt", "auto", "snapshot")


class Corruption(AssertionError):
    """What the device, the destination or fio read is not what was written."""


def _kill(dev: Served) -> None:
    dev.signal(signal.SIGKILL)
    dev.wait()


def _compare(a: str | Path, b: str | Path) -> str:
    try:
        return assert_same_bytes(a, b, SIZE)
    except AssertionError as e:
        raise Corruption(str(e)) from None


def _classify(e: AssertionError) -> str:
    """The count a round's failure goes to: fio reading back other data than it wrote is a
    corruption; fio failing otherwise (an I/O error), or the device counting errors, is a
    guest I/O error; anything else (a migration that failed, a timeout) a failure."""
    text = str(e)
    if isinstance(e, FioFailed):
        return "corruptions" if "verify" in text and ("bad" in text or "crc" in text) \
            else "guest_io_errors"
    return "guest_io_errors" if "guest I/O errors" in text else "failures"


def one_round(n: int, scratch: Path, rng: random.Random, counts: dict[str, int]) -> str:
    """Round ``n``; returns what it did.  Raises Corruption, or AssertionError (a failure)."""
    mode = MODES[(n // 2) % len(MODES)]
    to_nbd = n % 2 == 1
    work = Path(tempfile.mkdtemp(prefix=f"round{n}-", dir=scratch))
    image = work / "disk.img"
    sparse_image(image, SIZE, pattern(n, SIZE - 8 * MiB))
    server = start_nbd_server("qemu-nbd", "tcp", work, SIZE) if to_nbd else None
    dest: Path | str = server.uri if server else work / "dest.img"
    dev = start_serve(image, "--queues", "2", logdir=work / "logs")
    busy = FioLoop(dev.device, *BUSY, cwd=work, seed=1000 + 100 * n)
    busy.start()
    did = f"{mode} to {'NBD' if server else 'a file'}"
    try:
        busy.wait_runs(1)
        proc = start_migrate(dev.device, dest, "--mode", mode, "--speed", "8M")
        share = rng.uniform(0.2, 0.6)
        if server is None:  # kill the daemon, take over, resume
            wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] * share,
                           timeout=120, what=f"{share:.0%} copied")  # fmt: skip
            _kill(dev)
            r = wait_migrate(proc)
            assert r.returncode != 0, f"migrate --wait outlived its daemon: {r.stdout}"
            counts["daemon_kills"] += 1
            dev = start_serve(image, "--recover", dev.device, logdir=work / "logs")
            st = cli_status(dev.device)
            assert st["interrupted"] is not None, st
            proc = subprocess.Popen([*UBLKMIG, "migrate", dev.device, "--resume", "--wait"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL)  # fmt: skip
            did += f", daemon killed {share:.0%} in and resumed"
        elif server is not None:  # kill the server, start it again
            wait_migration(dev.device, lambda m: m["chunks_copied"] >= m["chunks"] * share,
                           timeout=120, what=f"{share:.0%} copied")  # fmt: skip
            server.stop(kill=True)
            time.sleep(1)
            server.restart()
            counts["server_restarts"] += 1
            did += f", server killed {share:.0%} in and restarted"
        finish_migrate(proc)
        check_completed(dev.device, dest, mode, lost_connections=server is not None)
        busy.mark()
        busy.stop()
        try:
            busy.verify()
        except AssertionError as e:
            raise Corruption(f"fio verify: {e}") from None
        counts["bytes_verified"] += BUSY[1]
        stats = cli_status(dev.device)["stats"]
        assert stats["errors"] == 0, f"guest I/O errors: {stats}"
        target = server.file if server else dest
        assert target is not None
        digest = _compare(dev.device, target)
        dev.stop()
        if sha256_of(target) != digest:
            raise Corruption("the destination differs from what the device showed")
        counts["bytes_verified"] += 2 * SIZE
        counts["guest_bytes_written"] += busy.written
        return did
    finally:
        busy.halt()
        if dev.proc.poll() is None:
            dev.stop()
        if server is not None:
            server.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = dict(migrations=0, daemon_kills=0, server_restarts=0, bytes_verified=0,
                  guest_bytes_written=0, corruptions=0, guest_io_errors=0, failures=0)  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="ubm-soak-", dir="/dev/shm"))
    kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    t0 = time.monotonic()
    for n in range(args.rounds):
        t = time.monotonic()
        try:
            did = one_round(n, scratch, rng, counts)
            counts["migrations"] += 1
            print(f"soak: round {n + 1}/{args.rounds}: {did}: ok "
                  f"({time.monotonic() - t:.0f} s)", flush=True)  # fmt: skip
        except Corruption as e:
            counts["corruptions"] += 1
            print(f"soak: round {n + 1}: CORRUPTION: {e}", flush=True)
        except AssertionError as e:
            key = _classify(e)
            counts[key] += 1
            print(f"soak: round {n + 1}: {key.upper()}: {e}\n{traceback.format_exc()}",
                  flush=True)  # fmt: skip
    result: dict[str, Any] = {"kernel": kernel, "seconds": round(time.monotonic() - t0),
                              **counts}  # fmt: skip
    print(f"soak-result: {json.dumps(result)}", flush=True)
    run_cli("list")  # (nothing should be left; a leftover shows in the VM's output)
    bad = counts["corruptions"] + counts["guest_io_errors"] + counts["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
