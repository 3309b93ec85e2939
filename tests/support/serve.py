"""A ``serve`` daemon a test spawned: ``Served.start(argv, image=..., logdir=...)``.

Its stdout and stderr go to files in ``logdir`` (a pipe nobody reads could fill and stall
the daemon); ``first_line()`` waits for the first line of its stdout: the device's path
(the real daemon; tests/vm/vmlib.py adds what a real device needs) or the image
(``spawn_fake_serve``: the host tests' daemon over a fake device, support/fake_serve.py).
``events(stderr)``: the ``event=`` names of a daemon's log, in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ublkmig import control

TESTS = Path(__file__).resolve().parents[1]
SERVE_TIMEOUT = 120.0  # python start + ADD_DEV + first read, under emulation
STOP_TIMEOUT = 60.0


class ServeFailed(AssertionError):
    pass


@dataclass
class Served:
    """One ``serve`` child."""

    argv: list[str]
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    image: Path
    returncode: int | None = None

    @classmethod
    def start(cls, argv: Sequence[str], *, image: Path, logdir: Path,
              env: dict[str, str] | None = None) -> Self:  # fmt: skip
        """Start ``argv`` (a ``serve`` of ``image``), its output to new files in ``logdir``."""
        logdir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="serve-", suffix=".out", dir=logdir)
        os.close(fd)
        out_path = Path(name)
        err_path = out_path.with_suffix(".err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(list(argv), proc, out_path, err_path, image)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"`{' '.join(self.argv)}` (pid {self.proc.pid}, rc {self.proc.poll()})\n"
                f"--- stdout:\n{self.stdout()[-4000:]}\n--- stderr:\n{self.stderr()[-8000:]}")

    def first_line(self, timeout: float = SERVE_TIMEOUT) -> str:
        """The first line of its stdout, with its newline, once printed (ServeFailed if the
        daemon exits first or prints none within ``timeout``: then it is killed)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            text = self.stdout()
            if "\n" in text:
                return text[: text.index("\n") + 1]
            if exited:
                raise ServeFailed(f"serve exited before printing a line:\n{self.describe()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServeFailed(f"serve printed nothing within {timeout:.0f} s:\n"
                                  f"{self.describe()}")  # fmt: skip
            time.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServeFailed(f"the daemon did not exit within {timeout:.0f} s:\n"
                              f"{self.describe()}") from None
        return self.returncode

    def finish(self, timeout: float = STOP_TIMEOUT) -> tuple[int, str, str]:
        """Wait for it to exit: (status, stdout, stderr)."""
        rc = self.wait(timeout)
        return rc, self.stdout(), self.stderr()

    def kill(self) -> None:
        """SIGKILL, if still running, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


def spawn_fake_serve(image: Path, run_dir: Path, *serve_args: str, fail_at: str = "",
                     pre: Sequence[str] = (), logdir: Path | None = None,
                     env: dict[str, str] | None = None) -> Served:  # fmt: skip
    """``ublkmig PRE... serve SERVE_ARGS... IMAGE`` over the fake device of
    support/fake_serve.py (``fail_at``: "create" or "start" fails that step), its control
    socket in ``run_dir``, its logs in ``logdir`` (default: beside the image), ``env`` added
    to its environment."""
    argv = [sys.executable, "-m", "support.fake_serve", fail_at, "--", *pre, "serve",
            *serve_args, str(image)]  # fmt: skip
    full_env = {
        **os.environ,
        control.ENV_RUN_DIR: str(run_dir),
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        **(env or {}),
    }
    return Served.start(argv, image=image, logdir=logdir or image.parent, env=full_env)


def events(stderr: str) -> list[str]:
    """The ``event=NAME`` fields of a daemon's (logfmt) log, in order: the NAMEs."""
    return [f.removeprefix("event=") for line in stderr.splitlines() for f in line.split()
            if f.startswith("event=")]  # fmt: skip
