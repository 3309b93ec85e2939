"""Size parsing and printing."""

import pytest

from ublkmig.errors import UserError
from ublkmig.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4096B", 4096),
        ("512K", 512 << 10),
        ("512k", 512 << 10),
        ("256M", 256 << 20),
        ("256MiB", 256 << 20),
        ("256Mi", 256 << 20),
        ("1G", 1 << 30),
        (" 1 g ", 1 << 30),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("1GB", 10**9),
        ("4kB", 4000),
        ("0.5K", 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-1", "1X", "5MX", "1.1K", "0.3", "M", "1 2"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserError):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (100, "100 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (256 << 20, "256 MiB"),
     (1 << 40, "1 TiB"), (3 << 29, "1.5 GiB")],
)  # fmt: skip
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_round_trip() -> None:
    for n in (512, 4096, 1 << 20, 256 << 20, 5 << 30):
        assert parse_size(format_size(n).replace(" ", "")) == n
