"""Exceptions of the control plane.

Everything a user (or the machine's set-up) can cause derives from
:class:`UblkmigError`; the CLI prints such an error as one line,
``ublkmig: error: <message>``, and exits 1.  Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UblkmigError(Exception):
    """An error the CLI reports as one line, without a traceback."""


class UserError(UblkmigError):
    """Bad input or an unsuitable machine: missing image, not root, no driver..."""
