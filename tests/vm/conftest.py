"""Fixtures of the real-device tests (tests/vm); the helpers are in vmlib.py.

They run where a ublk driver is, normally inside a kernel VM started by
``python -m ublkmig.vm pytest`` (``ci/test``), which sets UBLKMIG_IN_VM=1 and
UBLKMIG_VM_KERNEL ("unstable": zero copy; "lts": copy mode only):

- Inside such a VM a missing /dev/ublk-control, or not being root, FAILS
  every test: CI must never pass by skipping them.  Elsewhere the tests
  skip, saying how to run them.
- Every test here carries the ``vm`` marker.
- Images live on /dev/shm (the VM's root is read-only, and 9p is slow).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli
from support.images import sparse_image
from vmlib import (
    CONTROL,
    HERE,
    IN_VM,
    FioLoop,
    MakeImage,
    ServeFactory,
    run_fio,
)

from ublkmig.bench.nbd_server import NbdServer, start_nbd_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.vm)


def _why_no_ublk() -> str | None:
    if os.geteuid() != 0:
        return "the real-device tests need root"
    if not CONTROL.exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["modprobe", "ublk_drv"], capture_output=True, timeout=60)
        for _ in range(40):
            if CONTROL.exists():
                return None
            time.sleep(0.05)
        return f"no ublk driver here ({CONTROL} missing, Linux {os.uname().release})"
    return None


@pytest.fixture(scope="session")
def _ublk_state() -> str | None:
    return _why_no_ublk()


@pytest.fixture(autouse=True)
def _need_ublk(_ublk_state: str | None) -> None:
    if _ublk_state is None:
        return
    if IN_VM:
        pytest.fail(f"{_ublk_state}: inside the test VM this is a failure, not a skip")
    pytest.skip(f"{_ublk_state}; run them in a kernel VM: python -m ublkmig.vm pytest")


# ---- scratch space and images ---------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh folder on /dev/shm (tmpfs), removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="ubm-test-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_image(scratch: Path) -> MakeImage:
    """``make_image(size, name="disk.img", data=None)``: a sparse image of ``size`` bytes,
    with ``data`` written at offset 0 if given."""
    count = 0

    def make(size: int, name: str | None = None, data: bytes | None = None) -> Path:
        nonlocal count
        count += 1
        return sparse_image(scratch / (name or f"disk{count}.img"), size, data)

    return make


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start daemons: ``dev = serve(image, "--queues", "2")``; ``dev.device`` is the path."""
    factory = ServeFactory(tmp_path / "serve")
    yield factory
    factory.teardown()


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli("list", "--json")``: run ``python -m ublkmig ARGS`` (captured, text)."""
    return run_cli


@pytest.fixture
def fio(scratch: Path) -> Callable[..., dict[str, Any]]:
    """``fio(device, rw="randwrite", bs="4k", ...)`` -> fio's JSON report (see run_fio)."""

    def call(filename: str, **options: Any) -> dict[str, Any]:
        return run_fio(filename, cwd=scratch, **options)

    return call


@pytest.fixture
def nbd_server(scratch: Path) -> Iterator[Callable[..., NbdServer]]:
    """``nbd_server(kind, transport, size)``: a started vmlib.NbdServer (files in scratch),
    stopped at teardown (list it before ``serve``: the daemons stop first)."""
    servers: list[NbdServer] = []

    def start(kind: str, transport: str, size: int, **options: Any) -> NbdServer:
        server = start_nbd_server(kind, transport, scratch, size, **options)  # file, extra
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fio_loop(serve: ServeFactory, scratch: Path) -> Iterator[Callable[..., FioLoop]]:
    """``fio_loop(device, offset, length, **fio_options)``: a started vmlib.FioLoop; any
    still running at teardown is halted (before the daemons stop: this fixture depends on
    ``serve``, so its teardown comes first)."""
    loops: list[FioLoop] = []

    def start(device: str, offset: int, length: int, **options: Any) -> FioLoop:
        loop = FioLoop(device, offset, length, cwd=scratch, **options)
        loops.append(loop)
        loop.start()
        return loop

    yield start
    for loop in loops:
        loop.halt()
