"""``serve()``: the daemon in the foreground.  The checks, in order, before the driver is
touched (the image and its lock, root, a takeover or a superseded image, deltas to fold
back, the driver, a forced data path), then the Daemon's event loop."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import anyio

from ublkmig.daemon.checks import check_data_path, check_root, ensure_driver, open_image
from ublkmig.daemon.options import ServeOptions
from ublkmig.daemon.recovery import check_superseded, check_takeover, fold_back_snapshot
from ublkmig.daemon.server import Daemon


def serve(opts: ServeOptions, out: TextIO | None = None) -> int:
    """Run the daemon in the foreground; returns its exit status."""
    image = open_image(opts)
    try:
        check_root()
        # a takeover's own record names the image more precisely than a superseded mark
        if opts.recover is not None:
            check_takeover(opts.recover, image.path, force=opts.force)
        # (an NBD export is never migrated from, so never superseded, never has deltas)
        if not opts.force and isinstance(image.path, Path):
            check_superseded(image.path)
        if isinstance(image.path, Path):
            fold_back_snapshot(opts, image)
        ensure_driver()
        check_data_path(opts.data_path)
        d = Daemon(opts, image, out or sys.stdout)
        try:
            return anyio.run(d.run)
        finally:
            d.image.close()  # the destination's, after a completed migration
    finally:
        image.close()
