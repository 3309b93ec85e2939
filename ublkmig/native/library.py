"""Loading the data plane (the one cached CDLL), its prototypes, and its errors.

The data plane is built by ``pip install -e .`` into ``ublkmig/_native<suffix>``
(a plain shared object, no Python entry point).  It is loaded on first use, so
the rest of the control plane (and its error messages) works without it.
``$UBLKMIG_NATIVE_LIB`` names another build of it (e.g. a sanitizer build).
Each topic's module declares the prototypes of its calls (``PROTOS``); the
loader sets them all when it loads the library.

Everything the C side reports as a negative errno becomes a :class:`NativeError`
carrying the errno and ``ubm_last_error()``, read in the thread that made the
call (the C side keeps it per thread).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import importlib.machinery
import os
from pathlib import Path
from typing import Any

from ublkmig.errors import UblkmigError

API_VERSION = 5  # UBM_API_VERSION this binding was written against
ENV_LIB = "UBLKMIG_NATIVE_LIB"

# name -> (restype, argtypes) of the C calls a module makes (its PROTOS)
Prototypes = dict[str, tuple[Any, list[Any]]]


class NativeUnavailable(UblkmigError):
    """The shared object is not built (or does not load)."""


class NativeError(UblkmigError):
    """A data-plane call failed with a negative errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        self.detail = detail or os.strerror(err)
        super().__init__(self.detail)

    @property
    def errno_name(self) -> str:
        return errno_mod.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.detail} ({self.op}: {self.errno_name})"


def library_path() -> Path | None:
    """Where the built data plane is, or None."""
    if env := os.environ.get(ENV_LIB):
        return Path(env)
    here = Path(__file__).resolve().parent.parent  # ublkmig/, beside this package
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_native{suffix}"
        if candidate.exists():
            return candidate
    return None


_P = ctypes.c_void_p  # opaque struct ubm_dev * / struct ubm_sim *

PROTOS: Prototypes = {
    "ubm_last_error": (ctypes.c_char_p, []),
}


@functools.cache
def _lib() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise NativeUnavailable(
            "the data plane is not built (no ublkmig/_native*.so): run `pip install -e .`"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load the data plane {path}: {e}") from None
    # the topics' prototypes: imported here, not at the top, as those modules import this one
    from ublkmig.native import datapath, device, migration, sim

    protos: Prototypes = {
        **PROTOS, **datapath.PROTOS, **device.PROTOS, **migration.PROTOS, **sim.PROTOS,
    }  # fmt: skip
    for name, (restype, argtypes) in protos.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeUnavailable(f"the data plane {path} lacks {name}: rebuild it") from None
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def last_error() -> str:
    """ubm_last_error() of the calling thread."""
    raw = _lib().ubm_last_error()
    return raw.decode(errors="replace") if raw else ""


def _check(rc: int, op: str) -> int:
    if rc < 0:
        raise NativeError(op, -rc, last_error())
    return rc


def available() -> bool:
    try:
        _lib()
    except NativeUnavailable:
        return False
    return True
