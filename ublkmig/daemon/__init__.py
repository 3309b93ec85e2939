"""``ublkmig serve``: one ublk device for one image, for as long as the daemon runs.

The image is a file, a block device or an NBD export (its URI); a lost connection to an
export serving the device is dialled again by a task of the daemon (the keeper) while the
guest's requests wait for it in the data plane.

Lifecycle: validate the image and the options (before touching the driver),
check root, check ``/dev/ublk-control`` (``modprobe ublk_drv`` once if it is
missing), hold an exclusive non-blocking flock on the image, then in the event
loop: add the device (ADD_DEV + SET_PARAMS), listen on the control socket,
start it (queue threads + START_DEV), wait until ``/dev/ublkbN`` exists and
answers a read, print its path as the first stdout line, serve the control
socket until SIGINT/SIGTERM/SIGHUP or a ``stop`` request, then stop (in-flight I/O
completes), delete the device and remove the socket.

Live migration (ublkmig.migration) runs as a task of the daemon: the control
commands ``migrate``, ``status``, ``cutover``, ``cancel`` and ``speed`` drive it.
A migration running when the daemon stops is cancelled first (the source stays
authoritative).  After a completed one the daemon serves the destination: it
holds the destination's flock instead of the old image's, and ``info`` shows
it as the image.

Every blocking data-plane call runs in a worker thread; the event loop only
waits for it.

The files:

- ``options.py``: what the daemon is asked for: ``serve``'s options, a ``migrate`` request's
- ``checks.py``: the image (checked, opened and locked) and the driver (root, the module,
  a forced data path), before the device is added
- ``recovery.py``: what a dead daemon left: a superseded image, a device to take over, a
  snapshot migration's deltas to fold back
- ``server.py``: the Daemon: device lifecycle, control socket and commands, signals, the
  migration task, the keeper of an NBD image's connections
- ``entry.py``: ``serve()``: the checks in order, then the Daemon's event loop
"""

from __future__ import annotations

from ublkmig.daemon.checks import (
    CONTROL_DEVICE,
    DRIVER_HINT,
    Image,
    check_data_path,
    check_root,
    ensure_driver,
    find_server,
    open_image,
    same_image,
)
from ublkmig.daemon.entry import serve
from ublkmig.daemon.options import ServeOptions, parse_migrate_args
from ublkmig.daemon.recovery import (
    check_superseded,
    check_takeover,
    fold_back_snapshot,
    ublk_device_exists,
)
from ublkmig.daemon.server import KEEPER_POLL, READY_TIMEOUT, Daemon, State, _quiet_benign_races

__all__ = [
    "CONTROL_DEVICE",
    "DRIVER_HINT",
    "KEEPER_POLL",
    "READY_TIMEOUT",
    "Daemon",
    "Image",
    "ServeOptions",
    "State",
    "_quiet_benign_races",
    "check_data_path",
    "check_root",
    "check_superseded",
    "check_takeover",
    "ensure_driver",
    "find_server",
    "fold_back_snapshot",
    "open_image",
    "parse_migrate_args",
    "same_image",
    "serve",
    "ublk_device_exists",
]
