"""The command line's argument types: a device, a size, a rate."""

from __future__ import annotations

import re
from typing import Any

import click

from ublkmig.errors import UserError
from ublkmig.units import parse_rate, parse_size

_DEVICE_RE = re.compile(r"(?:/dev/)?(?:ublkb)?(\d+)")


class DeviceId(click.ParamType):
    """``/dev/ublkbN``, ``ublkbN`` or ``N`` -> N."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _DEVICE_RE.fullmatch(str(value).strip())
        if not m:
            self.fail(f"{value!r} is not a ublk device (expected /dev/ublkbN or N)", param, ctx)
        return int(m.group(1))


class Size(click.ParamType):
    """``256M``, ``1G``, ``4096``... -> bytes."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except UserError as e:
            self.fail(str(e), param, ctx)


class Rate(click.ParamType):
    """``100M``, ``100M/s``, ``1.5G/s``... -> bytes per second."""

    name = "BYTES/S"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_rate(str(value))
        except UserError as e:
            self.fail(str(e), param, ctx)
