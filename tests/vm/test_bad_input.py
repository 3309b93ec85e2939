"""Mistakes a user can make: each gives exactly one line on stderr and a non-zero exit,
never a traceback, and changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.cli import assert_one_line_error, run_cli
from vmlib import MakeImage, ServeFactory

MiB = 1 << 20


def _serve_fails(*args: str, as_nobody: bool = False) -> str:
    r = run_cli("serve", *args, as_nobody=as_nobody)
    line = assert_one_line_error(r, f"serve {' '.join(args)}")
    assert not any(p.startswith("ublkb") for p in os.listdir("/dev")), "a device was left"
    return line


def test_image_missing(scratch: Path) -> None:
    line = _serve_fails(str(scratch / "nope.img"))
    assert "nope.img" in line


def test_image_under_a_missing_directory(scratch: Path) -> None:
    _serve_fails(str(scratch / "no-such-dir" / "disk.img"))


def test_image_is_a_directory(scratch: Path) -> None:
    line = _serve_fails(str(scratch))
    assert "director" in line


def test_image_empty(make_image: MakeImage) -> None:
    line = _serve_fails(str(make_image(0)))
    assert "empty" in line


@pytest.mark.parametrize(("size", "lbs"), [(MiB + 512, "4096"), (1000, "512")])
def test_image_size_not_a_multiple_of_the_block_size(size: int, lbs: str,
                                                     make_image: MakeImage) -> None:
    line = _serve_fails(str(make_image(size)), "--logical-block-size", lbs)
    assert lbs in line


def test_not_root(make_image: MakeImage) -> None:
    image = make_image(4 * MiB)
    image.parent.chmod(0o755)
    image.chmod(0o666)
    line = _serve_fails(str(image), as_nobody=True)
    assert "root" in line


@pytest.mark.parametrize("device", ["99", "/dev/ublkb99"])
def test_stop_a_device_that_does_not_exist(device: str) -> None:
    r = run_cli("stop", device)
    line = assert_one_line_error(r, f"stop {device}")
    assert "99" in line


def test_serve_an_image_already_served(make_image: MakeImage, serve: ServeFactory) -> None:
    image = make_image(4 * MiB)
    first = serve(image)
    line = _serve_fails_while_served(str(image))
    assert first.device in line or "already" in line, line
    # the first daemon is unharmed
    assert first.proc.poll() is None and Path(first.device).is_block_device()
    first.stop()


def _serve_fails_while_served(image: str) -> str:
    r = run_cli("serve", image)
    return assert_one_line_error(r, f"second serve of {image}")
