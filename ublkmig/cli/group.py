"""The ``ublkmig`` click group: its global options (logging, version); the commands are
registered on it by devices.py, migrations.py and demo_bench.py."""

from __future__ import annotations

import click

from ublkmig import __version__, log


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(log.LEVELS, case_sensitive=False),
    default=None,
    help=f"Log level (default: ${log.ENV_LEVEL} or {log.DEFAULT_LEVEL}).",
)
@click.option("--log-json", is_flag=True, help="Logs as JSON lines instead of key=value.")
@click.version_option(__version__, prog_name="ublkmig")
def cli(log_level: str | None, log_json: bool) -> None:
    """Serve a disk image as a Linux block device (/dev/ublkbN) through ublk and io_uring."""
    log.configure(log_level, json=log_json)
