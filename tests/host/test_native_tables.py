"""The parts of ublkmig.native that need no built data plane: layouts, names, decoding."""

import ctypes
import dataclasses
import re
from pathlib import Path

import pytest

from ublkmig import native
from ublkmig.native import DataPath

UBM_H = Path(__file__).resolve().parents[2] / "native" / "ubm.h"
C_TYPES = {"const char *": ctypes.c_char_p, "uint32_t": ctypes.c_uint32,
           "int32_t": ctypes.c_int32, "uint64_t": ctypes.c_uint64}  # fmt: skip


def header_struct(name: str) -> list[tuple[str, object]]:
    """(field, ctypes type) of ``struct <name>`` in native/ubm.h, in order."""
    text = re.sub(r"/\*.*?\*/", "", UBM_H.read_text(), flags=re.S)
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, flags=re.S)
    assert body, f"struct {name} not in {UBM_H}"
    fields = []
    for decl in body.group(1).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(const char \*|\w+) ?(.*)", decl)
        assert m and m.group(1) in C_TYPES, decl
        fields += [(f.strip(), C_TYPES[m.group(1)]) for f in m.group(2).split(",")]
    return fields


def test_struct_layouts_match_ubm_h() -> None:
    config = [(f, t) for f, t in native._Config._fields_]
    assert config == header_struct("ubm_config")
    # ubm_stats: the same counters in the same order, then the binding's spare tail
    assert [(f, t) for f, t in native._Stats._fields_][:-1] == header_struct("ubm_stats")
    assert list(native.STAT_FIELDS) == [f for f, _ in header_struct("ubm_stats")]
    ptr = ctypes.sizeof(ctypes.c_void_p)
    assert native._Config.dev_id.offset == ptr + 7 * 4
    assert native._Config.recover.offset == ptr + 8 * 4
    assert ctypes.sizeof(native._Config) == ptr + 12 * 4  # (padded to the pointer's alignment)


def test_migration_struct_layouts_match_ubm_h() -> None:
    assert [(f, t) for f, t in native._MigConfig._fields_] == header_struct("ubm_mig_config")
    # ubm_mig_stats: the same fields and types in order, then the binding's spare tail
    assert [(f, t) for f, t in native._MigStats._fields_][:-1] == header_struct("ubm_mig_stats")
    assert list(native.MIG_STAT_FIELDS) == [f for f, _ in header_struct("ubm_mig_stats")]
    assert [f.name for f in dataclasses.fields(native.MigStats)] == list(native.MIG_STAT_FIELDS)
    ptr = ctypes.sizeof(ctypes.c_void_p)
    assert native._MigConfig.chunk_size.offset == ptr + 8
    # three u32s (direct, copy_depth, busy_depth), padded to the pointer
    assert native._MigConfig.delta_path.offset == ptr + 8 + 16 + 3 * 4 + 4
    # error (int32) follows 18 u64s; delta_chunks is 8-aligned after 5 x 32-bit fields
    assert native._MigStats.error.offset == 18 * 8
    assert native._MigStats.delta_chunks.offset == 18 * 8 + 5 * 4 + 4


def test_migration_enums_match_ubm_h() -> None:
    text = UBM_H.read_text()
    for mode in native.MigMode:
        assert re.search(rf"UBM_MIG_{mode.name}\s*=\s*{int(mode)},", text), mode
    for kind in native.Pass:
        assert re.search(rf"UBM_PASS_{kind.name}\s*=\s*{int(kind)},", text), kind
    assert [m.label for m in native.MigMode] == ["mirror", "dbt", "snapshot"]
    assert native.MigMode.from_label("dbt") is native.MigMode.DBT
    assert (native.MIN_CHUNK_SIZE, native.MAX_CHUNK_SIZE) == (64 << 10, 64 << 20)
    assert "power of two, 64 KiB .. 64 MiB" in text


def test_data_path_labels() -> None:
    assert [p.label for p in DataPath] == ["auto", "auto-zc", "zc", "copy"]
    for p in DataPath:
        assert DataPath.from_label(p.label) is p
    assert int(DataPath.AUTO_ZC) == 1 and int(DataPath.COPY) == 3


def test_decode_features() -> None:
    assert native.decode_features(0) == []
    assert native.decode_features(1) == ["SUPPORT_ZERO_COPY"]
    assert native.decode_features(1 << 11 | 1 << 19) == ["AUTO_BUF_REG", "SHMEM_ZC"]
    # Debian trixie's 6.12 measured 0x1fe
    assert native.decode_features(0x1FE) == [
        "URING_CMD_COMP_IN_TASK", "NEED_GET_DATA", "USER_RECOVERY", "USER_RECOVERY_REISSUE",
        "UNPRIVILEGED_DEV", "CMD_IOCTL_ENCODE", "USER_COPY", "ZONED",
    ]  # fmt: skip
    assert native.decode_features(1 << 40) == ["BIT40"]
    assert len(native.decode_features((1 << 20) - 1)) == 20


@pytest.mark.parametrize(
    ("mask", "offered"),
    [
        (0x1FE, [DataPath.COPY]),
        (0x1FF, [DataPath.ZC, DataPath.COPY]),
        ((1 << 20) - 1, [DataPath.AUTO_ZC, DataPath.ZC, DataPath.COPY]),
    ],
)
def test_paths_offered(mask: int, offered: list[DataPath]) -> None:
    assert native.paths_offered(mask) == offered


def test_io_constants() -> None:
    assert [int(op) for op in native.Op] == [0, 1, 2, 3, 5]
    assert native.F_FUA == 1 << 13


def test_native_error_text() -> None:
    e = native.NativeError("create", 1, "ADD_DEV refused")
    assert e.errno == 1 and e.errno_name == "EPERM"
    assert str(e) == "ADD_DEV refused (create: EPERM)"
    assert "Operation not permitted" in str(native.NativeError("create", 1))


needs_native = pytest.mark.skipif(not native.available(), reason="data plane not built")


@needs_native
def test_path_names_and_choice_from_the_library() -> None:
    assert [native.path_name(p) for p in DataPath] == [p.label for p in DataPath]
    assert native.choose_path(0x1FE) is DataPath.COPY
    assert native.choose_path(0x1FF) is DataPath.ZC
    assert native.choose_path((1 << 20) - 1) is DataPath.AUTO_ZC
    for mask in (0, 0x1FE, 0x1FF, (1 << 20) - 1):
        assert native.choose_path(mask) == native.paths_offered(mask)[0]
