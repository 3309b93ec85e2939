"""`ublkmig serve` with the data plane replaced by a fake device (host tests of the daemon).

Usage: python -m support.fake_serve [FAIL_AT] -- SERVE-ARGS...  (tests/ on $PYTHONPATH;
support.serve.spawn_fake_serve starts it)
FAIL_AT: "" (no failure), "create" or "start": that step raises NativeError.
The fake's block device is the image itself, so the readiness probe reads a real file.
Everything else (validation, flock, control socket, signals, logs, stdout) is the real code.
Migrations run on the real data plane: the fake's target() is a simulator of the image
(tests/support/sim_guest.py), so `migrate` really copies the image to its destination.
$UBLKMIG_FAKE_POLICY (JSON) shortens the migration policy's timings.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import Any

from ublkmig import cli, daemon, migration, native
from ublkmig.daemon import entry as daemon_entry

FAIL_AT = sys.argv[1]


class FakeDevice:
    def __init__(self, config: native.DeviceConfig) -> None:
        self.config = config
        self.id = 42
        self.size = os.stat(config.source).st_size
        self.data_path = native.DataPath.COPY
        self.path_name = "copy"
        self.flags = 0x80
        self.block_path = str(config.source)
        self.state = "added"
        self.guest: Any = None

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
        if self.guest is not None:
            self.guest.stop()
            self.guest.sim.close()
            self.guest = None
        print("fake.destroy", file=sys.stderr, flush=True)
        self.state = "destroyed"

    def stats(self) -> dict[str, Any]:
        return dict.fromkeys(native.STAT_FIELDS, 1)

    def target(self) -> Any:
        """A simulator of the image, driven by a guest thread that runs the migration's calls
        (no guest I/O of its own)."""
        from support.sim_guest import SimGuest, SimTarget

        if self.guest is None:
            sim = native.Sim(self.config.source)
            self.guest = SimGuest(sim, bytearray(), io=False).start()
        return SimTarget(self.guest)


native.Device = FakeDevice  # type: ignore[assignment,misc]
# (serve() looks its checks up in ublkmig.daemon.entry)
daemon_entry.check_root = lambda: None
if policy := os.environ.get("UBLKMIG_FAKE_POLICY"):
    _init = daemon.Daemon.__init__

    def _init_with_policy(self: daemon.Daemon, *args: Any, **kwargs: Any) -> None:
        _init(self, *args, **kwargs)
        self.migration_policy = migration.Policy(**json.loads(policy))

    daemon.Daemon.__init__ = _init_with_policy  # type: ignore[method-assign]
daemon_entry.ensure_driver = lambda: None
sys.exit(cli.main(sys.argv[sys.argv.index("--") + 1 :]))
