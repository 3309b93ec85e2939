"""The data paths (enum ubm_data_path) and the driver's UBLK_F_* features that allow them."""

from __future__ import annotations

import ctypes
import enum

from ublkmig.native.library import Prototypes, _check, _lib


class DataPath(enum.IntEnum):
    """enum ubm_data_path."""

    AUTO = 0
    AUTO_ZC = 1  # UBLK_F_AUTO_BUF_REG (Linux 6.16+)
    ZC = 2  # UBLK_F_SUPPORT_ZERO_COPY, explicit register (6.15+)
    COPY = 3  # per-tag buffers, the kernel copies

    @property
    def label(self) -> str:
        """The name ubm_path_name() gives, without needing the library (CLI choices)."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> DataPath:
        return cls[label.upper().replace("-", "_")]


# UBLK_F_* bit -> name, for `ublkmig features`.
FEATURE_NAMES: dict[int, str] = {
    0: "SUPPORT_ZERO_COPY",
    1: "URING_CMD_COMP_IN_TASK",
    2: "NEED_GET_DATA",
    3: "USER_RECOVERY",
    4: "USER_RECOVERY_REISSUE",
    5: "UNPRIVILEGED_DEV",
    6: "CMD_IOCTL_ENCODE",
    7: "USER_COPY",
    8: "ZONED",
    9: "USER_RECOVERY_FAIL_IO",
    10: "UPDATE_SIZE",
    11: "AUTO_BUF_REG",
    12: "QUIESCE",
    13: "PER_IO_DAEMON",
    14: "BUF_REG_OFF_DAEMON",
    15: "BATCH_IO",
    16: "INTEGRITY",
    17: "SAFE_STOP_DEV",
    18: "NO_AUTO_PART_SCAN",
    19: "SHMEM_ZC",
}
F_SUPPORT_ZERO_COPY = 1 << 0
F_AUTO_BUF_REG = 1 << 11

# What the driver must offer for a forced data path, and since which Linux.
PATH_NEEDS: dict[DataPath, tuple[int, str]] = {
    DataPath.AUTO_ZC: (F_AUTO_BUF_REG, "6.16"),
    DataPath.ZC: (F_SUPPORT_ZERO_COPY, "6.15"),
    DataPath.COPY: (0, "6.0"),
}


def decode_features(mask: int) -> list[str]:
    """Names of the UBLK_F_* bits set in ``mask`` (unknown bits as ``BIT<n>``)."""
    return [FEATURE_NAMES.get(bit, f"BIT{bit}") for bit in range(64) if mask >> bit & 1]


def paths_offered(mask: int) -> list[DataPath]:
    """The data paths a driver with these features can run, best first."""
    return [p for p, (need, _) in PATH_NEEDS.items() if mask & need == need]


PROTOS: Prototypes = {
    "ubm_get_features": (ctypes.c_int, [ctypes.POINTER(ctypes.c_uint64)]),
    "ubm_choose_path": (ctypes.c_int, [ctypes.c_uint64]),
    "ubm_path_name": (ctypes.c_char_p, [ctypes.c_int]),
}


def features() -> int:
    """UBLK_U_CMD_GET_FEATURES of the running driver (NativeError ENOENT: no driver)."""
    value = ctypes.c_uint64(0)
    _check(_lib().ubm_get_features(ctypes.byref(value)), "get_features")
    return int(value.value)


def choose_path(feature_mask: int) -> DataPath:
    """The data path UBM_PATH_AUTO picks for these features."""
    return DataPath(_check(_lib().ubm_choose_path(feature_mask), "choose_path"))


def path_name(path: int) -> str:
    """ubm_path_name(): "auto-zc", "zc", "copy" (or "auto")."""
    raw = _lib().ubm_path_name(int(path))
    return raw.decode() if raw else "?"
