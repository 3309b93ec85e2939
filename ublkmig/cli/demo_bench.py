"""The commands that run a whole scenario: ``demo`` and ``bench`` (inside the kernel VM
when this host has no ublk driver)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ublkmig.cli.group import cli
from ublkmig.cli.params import Size


@cli.command()
@click.option(
    "--size", type=Size(), default="256M", show_default=True, help="Size of the demo image."
)
@click.option("--in-vm", is_flag=True, hidden=True, help="Run here even without ublk (VM side).")
def demo(size: int, in_vm: bool) -> int:
    """Serve a fresh image, put ext4 on it, write, remount, verify, fsck, stop.

    Without a ublk driver on this host, runs itself inside a kernel VM.
    """
    from ublkmig import demo as demo_mod

    return demo_mod.run(size=size, in_vm=in_vm)


@cli.command()
@click.option("--scenario", "scenario", multiple=True, metavar="NAME",
              help="datapath, idle, load, large (the load on a 1 GiB disk), slow, yield or "
              "qemu (repeatable); default: all.")
@click.option("--quick", is_flag=True, help="The small smoke run (what CI runs).")
@click.option("--docs", is_flag=True,
              help="Also rewrite these scenarios' sections of docs/BENCHMARKS.md and its "
              "plots; the other sections keep their latest run (docs/benchmarks/results.json)."
              "  Not with --quick.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where results.json, report.md and the plots go.  [default: "
              "bench-results/<time>]")
@click.option("--inside", is_flag=True, hidden=True, help="Run here (the VM side).")
@click.option("--command", "command", hidden=True, default=None)
def bench(scenario: tuple[str, ...], quick: bool, docs: bool, out: Path | None, inside: bool,
          command: str | None) -> int:  # fmt: skip
    """Benchmark the data path and migration against the raw file, kublk and dd.

    Without a ublk driver on this host, runs inside the kernel VM.  With --docs it also
    rewrites its scenarios' sections of docs/BENCHMARKS.md (every scenario takes hours
    under emulation, so the sections can be run a few at a time).
    """
    from ublkmig.bench import run as bench_run

    out = out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    return bench_run.main(scenario, quick, out.absolute(), inside,
                          command or bench_run.default_command(), docs=docs)
