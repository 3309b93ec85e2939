"""ctypes binding of the C data plane (native/ubm.h): the only package that knows ctypes.

The data plane is built by ``pip install -e .`` into ``ublkmig/_native<suffix>``
(a plain shared object, no Python entry point).  It is loaded on first use, so
the rest of the control plane (and its error messages) works without it.
``$UBLKMIG_NATIVE_LIB`` names another build of it (e.g. a sanitizer build).

Everything the C side reports as a negative errno becomes a :class:`NativeError`
carrying the errno and ``ubm_last_error()``, read in the thread that made the
call (the C side keeps it per thread).

Callers use this package's names (``native.Sim``, ``from ublkmig.native import
MigStats``); the modules, bottom to top, each declaring the prototypes of its
own C calls (``PROTOS``) beside the structs they take:

- ``library``: finding and loading the shared object (once, cached; ``ENV_LIB``),
  setting every module's prototypes, ``API_VERSION``, the errors
  (``NativeUnavailable``, ``NativeError``, ``last_error``, ``_check``), ``available()``;
- ``datapath``: ``DataPath``, the driver's UBLK_F_* features (``FEATURE_NAMES``,
  ``PATH_NEEDS``, ``decode_features``, ``paths_offered``), ``features()``,
  ``choose_path()``, ``path_name()``;
- ``migration``: ``MigMode``, ``Pass``, the chunk size bounds, ``MigrationConfig``,
  ``MigStats`` (and their structs), ``Target`` (a device's or a simulator's
  migration calls);
- ``device``: ``DeviceConfig`` (and struct ubm_config's limits), ``Device``, the
  counters (``STAT_FIELDS``, struct ubm_stats);
- ``sim``: ``Sim`` (the data plane without ublk, for host tests), ``Op``, ``F_FUA``,
  ``Completion``.
"""

from ublkmig.native.datapath import (
    F_AUTO_BUF_REG,
    F_SUPPORT_ZERO_COPY,
    FEATURE_NAMES,
    PATH_NEEDS,
    DataPath,
    choose_path,
    decode_features,
    features,
    path_name,
    paths_offered,
)
from ublkmig.native.device import (
    DEFAULT_MAX_IO_BYTES,
    DEFAULT_NBD_TIMEOUT,
    DEFAULT_RECONNECT_WAIT,
    LOGICAL_BLOCK_SIZES,
    MAX_DEPTH,
    MAX_QUEUES,
    STAT_FIELDS,
    Device,
    DeviceConfig,
)
from ublkmig.native.device import _Config as _Config
from ublkmig.native.device import _Stats as _Stats
from ublkmig.native.library import (
    API_VERSION,
    ENV_LIB,
    NativeError,
    NativeUnavailable,
    available,
    last_error,
    library_path,
)
from ublkmig.native.library import _lib as _lib
from ublkmig.native.migration import (
    MAX_CHUNK_SIZE,
    MIG_STAT_FIELDS,
    MIG_STAT_TYPES,
    MIN_CHUNK_SIZE,
    MigMode,
    MigrationConfig,
    MigStats,
    Pass,
    Target,
)
from ublkmig.native.migration import _MigConfig as _MigConfig
from ublkmig.native.migration import _MigStats as _MigStats
from ublkmig.native.sim import F_FUA, Completion, Op, Sim

__all__ = [
    # library
    "API_VERSION",
    "ENV_LIB",
    "NativeError",
    "NativeUnavailable",
    "available",
    "last_error",
    "library_path",
    # datapath
    "FEATURE_NAMES",
    "F_AUTO_BUF_REG",
    "F_SUPPORT_ZERO_COPY",
    "PATH_NEEDS",
    "DataPath",
    "choose_path",
    "decode_features",
    "features",
    "path_name",
    "paths_offered",
    # migration
    "MAX_CHUNK_SIZE",
    "MIG_STAT_FIELDS",
    "MIG_STAT_TYPES",
    "MIN_CHUNK_SIZE",
    "MigMode",
    "MigStats",
    "MigrationConfig",
    "Pass",
    "Target",
    # device
    "DEFAULT_MAX_IO_BYTES",
    "DEFAULT_NBD_TIMEOUT",
    "DEFAULT_RECONNECT_WAIT",
    "LOGICAL_BLOCK_SIZES",
    "MAX_DEPTH",
    "MAX_QUEUES",
    "STAT_FIELDS",
    "Device",
    "DeviceConfig",
    # sim
    "F_FUA",
    "Completion",
    "Op",
    "Sim",
]
