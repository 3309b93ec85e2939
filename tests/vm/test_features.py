"""`ublkmig features` / `list` and the data paths the running kernel offers."""

from __future__ import annotations

import json
import re

import pytest
from support.cli import assert_one_line_error, run_cli
from vmlib import (
    ALL_PATHS,
    IN_VM,
    KERNEL,
    KERNEL_AUTO,
    KERNEL_PATHS,
    MakeImage,
    ServeFactory,
    data_paths,
    device_info,
)

from ublkmig import vm

pytestmark = pytest.mark.every_kernel  # what the kernel offers, and what the CLI says of it

MiB = 1 << 20


def test_the_vm_says_which_kernel_it_booted() -> None:
    if IN_VM:
        assert KERNEL in KERNEL_PATHS, f"UBLKMIG_VM_KERNEL={KERNEL!r}: the runner must set it"
    assert vm.have_ublk()


def test_features_names_the_data_path() -> None:
    r = run_cli("features")
    assert r.returncode == 0, r.stderr
    j = run_cli("features", "--json")
    assert j.returncode == 0, j.stderr
    info = json.loads(j.stdout)
    auto = info["data_path"]
    assert auto in ALL_PATHS
    assert re.search(rf"^data path\s+{re.escape(auto)}\b", r.stdout, re.M), r.stdout
    if KERNEL:
        assert auto == KERNEL_AUTO[KERNEL], f"on {KERNEL} auto must pick {KERNEL_AUTO[KERNEL]}"
        assert set(info["data_paths"]) == set(KERNEL_PATHS[KERNEL]), info
    assert set(data_paths()) <= set(info["data_paths"])


def test_a_data_path_the_kernel_lacks_is_refused(make_image: MakeImage) -> None:
    """Forcing a path the driver does not offer: one line, non-zero (on the unstable
    kernel every path is offered, which the features test checks)."""
    image = make_image(4 * MiB)
    missing = [p for p in ALL_PATHS if p not in data_paths()]
    for path in missing:
        r = run_cli("serve", str(image), "--data-path", path)
        line = assert_one_line_error(r, f"serve --data-path {path}")
        assert path in line, line
    if KERNEL == "lts":
        assert missing == ["auto-zc", "zc"]


def test_list_shows_the_served_device(make_image: MakeImage, serve: ServeFactory) -> None:
    image = make_image(8 * MiB)
    dev = serve(image, "--queues", "2", "--depth", "16")
    info = device_info(dev.device)
    assert info["image"] == str(image)
    assert info["size"] == 8 * MiB
    assert info["queues"] == 2 and info["depth"] == 16
    assert info["data_path"] == (KERNEL_AUTO[KERNEL] if KERNEL else info["data_path"])
    r = run_cli("list")
    assert r.returncode == 0 and dev.device in r.stdout, r.stdout + r.stderr
    dev.stop("cli")
    after = json.loads(run_cli("list", "--json").stdout)
    assert all(d.get("path") != dev.device for d in after), after
