"""Host test fixtures: a private run dir for control sockets."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ublkmig import control


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$UBLKMIG_RUN_DIR pointing at a fresh directory (short path: sockets are <108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ubm-run-"))
    monkeypatch.setenv(control.ENV_RUN_DIR, str(d))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
