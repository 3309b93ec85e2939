"""The CLI as the tests run it, and its one-line errors.

- ``call_main(capsys, *argv)``: ``ublkmig.cli.main`` in this process (quick; what it prints
  is captured by pytest's capsys);
- ``run_cli(*args)``: ``python -m ublkmig ARGS`` as a child process, as a user runs it (exit
  status and output exactly as they see them; ``as_nobody=True``: as uid 65534);
- ``one_error_line(stderr)``: the CLI's error is exactly one ``ublkmig: error: `` line;
- ``assert_one_line_error(result, what)``: a child that failed with one line on stderr and
  no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from ublkmig.cli import main

REPO = Path(__file__).resolve().parents[2]
UBLKMIG = [sys.executable, "-m", "ublkmig"]
CLI_TIMEOUT = 120.0  # python start and a command, under emulation
ERROR_PREFIX = "ublkmig: error: "


def call_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``ublkmig ARGV`` through ``ublkmig.cli.main`` in this process: (status, stdout,
    stderr)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """``err`` (a stderr) is exactly one line, ``ublkmig: error: MESSAGE``: the MESSAGE."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    return lines[0].removeprefix(ERROR_PREFIX)


def run_cli(*args: str, timeout: float = CLI_TIMEOUT, as_nobody: bool = False,
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``python -m ublkmig ARGS`` in a child process from the repo root (stdin /dev/null,
    output captured as text); ``as_nobody``: as uid/gid 65534 (see as_nobody_argv)."""
    argv: list[str] = [*UBLKMIG, *args]
    if as_nobody:
        argv = as_nobody_argv(argv)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO, stdin=subprocess.DEVNULL)  # fmt: skip


def as_nobody_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` run as nobody (uid/gid 65534, no groups, no capabilities).

    This interpreter may live where nobody cannot reach it (pyenv under /root,
    mode 0700): then the command runs in a private mount namespace where /root
    is an overlay of itself with mode 0755; nothing else changes.
    """
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--"]
    if _reachable_by_others(Path(sys.executable)):
        return [*drop, *argv]
    script = (
        "set -e; u=$(mktemp -d /run/ubm-nobody.XXXXXX); "
        "mkdir $u/up $u/work; "
        "mount -t overlay overlay -o lowerdir=/root,upperdir=$u/up,workdir=$u/work /root; "
        'chmod 0755 /root; exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            *drop, *argv]


def _reachable_by_others(path: Path) -> bool:
    for p in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            mode = p.stat().st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return True


def assert_one_line_error(r: subprocess.CompletedProcess[str], what: str) -> str:
    """A user error: non-zero exit, exactly one line on stderr, no traceback.  The line."""
    detail = f"{what}: rc {r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}"
    assert r.returncode != 0, detail
    assert "Traceback" not in r.stderr + r.stdout, detail
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr; {detail}"
    return lines[0]
