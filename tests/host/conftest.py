"""Host test fixtures: a private state dir, a private run dir for control sockets, a scratch
folder on a disk filesystem."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ublkmig import control, state


@pytest.fixture(autouse=True)
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$UBLKMIG_STATE_DIR pointing at a fresh directory for every test (and the daemons it
    starts): no test reads or leaves superseded-image marks in /var/lib/ublkmig."""
    d = Path(tempfile.mkdtemp(prefix="ubm-state-"))
    monkeypatch.setenv(state.ENV_STATE_DIR, str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$UBLKMIG_RUN_DIR pointing at a fresh directory (short path: sockets are <108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ubm-run-"))
    monkeypatch.setenv(control.ENV_RUN_DIR, str(d))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A fresh folder on /var/tmp: a disk filesystem (holes, O_DIRECT, FALLOC_FL_ZERO_RANGE),
    where the images of the data-plane tests go; removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="ubm-test-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
