"""Shared by every test.

tests/host: run on the host (no ublk driver needed): `.venv/bin/pytest tests/host`.
tests/vm:   need a real ublk driver; ci/test runs them inside kernel VMs with
            `python -m ublkmig.vm pytest` (see ublkmig/vm.py, tests/vm/conftest.py).

tests/support: the helpers both use (a package: ``from support.cli import run_cli``).

The test folders are not packages (pytest's default "prepend" import mode), so
test module basenames must be unique across tests/host and tests/vm.  That mode puts
this file's folder, tests/, on sys.path, which is what makes ``support`` importable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
