"""`ublkmig serve` with the data plane replaced by a fake device (host tests of the daemon).

Usage: python fake_serve.py [FAIL_AT] -- SERVE-ARGS...
FAIL_AT: "" (no failure), "create" or "start": that step raises NativeError.
The fake's block device is the image itself, so the readiness probe reads a real file.
Everything else (validation, flock, control socket, signals, logs, stdout) is the real code.
"""

from __future__ import annotations

import errno
import sys
import time
from typing import Any

from ublkmig import cli, daemon, native

FAIL_AT = sys.argv[1]


class FakeDevice:
    def __init__(self, config: native.DeviceConfig) -> None:
        self.config = config
        self.id = 42
        self.size = 1 << 20
        self.data_path = native.DataPath.COPY
        self.path_name = "copy"
        self.flags = 0x80
        self.block_path = str(config.source)
        self.state = "added"

    @classmethod
    def create(cls, config: native.DeviceConfig) -> FakeDevice:
        if FAIL_AT == "create":
            raise native.NativeError("create", errno.EPERM, "ADD_DEV refused")
        return cls(config)

    def start(self) -> None:
        if FAIL_AT == "start":
            raise native.NativeError("start", errno.EIO, "START_DEV failed")
        self.state = "started"

    def stop(self) -> None:
        time.sleep(0.2)  # in-flight I/O completing
        print("fake.stop", file=sys.stderr, flush=True)
        self.state = "stopped"

    def destroy(self) -> None:
        print("fake.destroy", file=sys.stderr, flush=True)
        self.state = "destroyed"

    def stats(self) -> dict[str, Any]:
        return dict.fromkeys(native.STAT_FIELDS, 1)


native.Device = FakeDevice  # type: ignore[assignment,misc]
daemon.check_root = lambda: None
daemon.ensure_driver = lambda: None
sys.exit(cli.main(sys.argv[sys.argv.index("--") + 1 :]))
