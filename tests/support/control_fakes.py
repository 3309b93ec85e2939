"""Fakes for host tests of the control socket: a ControlServer in a background event loop, and
an ``info`` handler answering like a daemon."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from anyio.from_thread import start_blocking_portal

from ublkmig import control


@contextlib.contextmanager
def serving(path: Path, handlers: dict[str, control.Handler]) -> Iterator[control.ControlServer]:
    """A ControlServer with these handlers, listening on ``path`` in a background event loop."""
    server = control.ControlServer(path)
    for cmd, handler in handlers.items():
        server.register(cmd, handler)
    with start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        try:
            yield server
        finally:
            future.cancel()


def fake_info(**overrides: Any) -> control.Handler:
    async def info(args: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": 5, "path": "/dev/ublkb5", "image": "/nonexistent.img", "size": 1 << 20,
            "queues": 1, "depth": 128, "lbs": 512, "read_only": False, "direct": False,
            "data_path": "copy", "flags": 0, "state": "running", "pid": os.getpid(),
            "stats": {}, **overrides,
        }  # fmt: skip

    return info
