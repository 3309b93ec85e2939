"""The ``ublkmig`` command line (click).

Errors a user can cause are printed as one line, ``ublkmig: error: <message>``,
with exit status 1 (2 for usage errors); never a traceback.

The files:

- ``group.py``: the ``ublkmig`` group and its global options (logging, version)
- ``params.py``: the argument types (a device, a size, a rate)
- ``devices.py``: ``serve``, ``list``, ``stop``, ``features``
- ``migrations.py``: ``migrate``, ``status``, ``cutover``, ``cancel``, ``speed``
- ``demo_bench.py``: ``demo``, ``bench``
- ``request.py``: one control request to a device's daemon
- ``render.py``: a migration's status as text (``status``, the progress lines)
- ``follow.py``: following a running migration until it ends (the progress bar)
- ``entry.py``: ``main``, the console entry point: errors as one line and an exit status

Start-up time matters (the CLI runs under slow emulation in the VM tests): the
heavy imports (anyio, the daemon, the migration machine, rich) stay inside the
commands that need them.
"""

from __future__ import annotations

# importing the command modules registers their commands on the group
from ublkmig.cli import demo_bench, devices, migrations  # noqa: F401
from ublkmig.cli.entry import main
from ublkmig.cli.group import cli
from ublkmig.cli.render import _status_lines

__all__ = ["_status_lines", "cli", "main"]
