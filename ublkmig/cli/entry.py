"""``main``, the console entry point: runs the ``ublkmig`` group and turns user-caused
errors into one line and an exit status."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import click

from ublkmig.cli.group import cli
from ublkmig.errors import UblkmigError


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _error(message: str) -> None:
    print(f"ublkmig: error: {_one_line(message)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the CLI and turns user-caused errors into one line and an exit status."""
    try:
        rv = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="ublkmig",
            standalone_mode=False,
        )
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        return e.exit_code
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(e.format_message() + hint)
        return e.exit_code
    except click.ClickException as e:
        _error(e.format_message())
        return e.exit_code
    except click.Abort:
        _error("aborted")
        return 1
    except UblkmigError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `ublkmig list | head -1`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rv if isinstance(rv, int) else 0
