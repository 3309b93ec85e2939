"""``ublkmig bench``: run the scenarios where a ublk driver is (the kernel VM when this
host has none), then write results.json, report.md and the plots, and print the tables."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ublkmig import vm
from ublkmig.bench import report, scenarios, targets
from ublkmig.errors import UserError

SCENARIOS = ("datapath", "idle", "load", "large", "slow", "yield", "qemu")
WORKDIR = Path("/run/ublkmig-bench")
DOCS = vm.REPO / "docs"


def main(names: tuple[str, ...], quick: bool, out: Path, inside: bool, command: str,
         docs: bool = False) -> int:  # fmt: skip
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown scenario {', '.join(unknown)}: choose from "
                        f"{', '.join(SCENARIOS)}")  # fmt: skip
    if docs and quick:
        raise UserError("--docs takes a run without --quick: the docs show the full settings")
    names = names or SCENARIOS
    if docs and not inside:
        check_docs(names)  # before the hours of the run, not after
    if inside or vm.have_ublk():
        rc = _run_here(names, quick, out, command, in_vm=inside)
    else:
        rc = _run_in_vm(names, quick, out, command)
    if rc == 0 and docs and not inside:
        update_docs(out, names)
    return rc


def _build_kublk() -> None:
    """kublk from the unstable kernel's source (cached; ci/kernels fetches it once)."""
    if targets.kublk_binary().is_file():
        return
    print("building kublk, the kernel's selftest ublk server (ci/kernels kublk)", flush=True)
    r = subprocess.run([str(vm.REPO / "ci" / "kernels"), "kublk"], stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise UserError("ci/kernels kublk failed: cannot compare with kublk (see above)")


def _run_in_vm(names: tuple[str, ...], quick: bool, out: Path, command: str) -> int:
    print(f"This host (Linux {os.uname().release}) has no ublk driver: running the benchmark "
          "in the kernel VM (Debian unstable's Linux, under emulation).", flush=True)  # fmt: skip
    if "datapath" in names:
        _build_kublk()
    rw = Path(tempfile.mkdtemp(prefix="ublkmig-bench-", dir="/tmp"))
    try:
        argv = [sys.executable, "-m", "ublkmig", "bench", "--inside", "--out", str(rw / "out"),
                "--command", command, *(["--quick"] if quick else [])]  # fmt: skip
        for n in names:
            argv += ["--scenario", n]
        res = vm.run_in_vm(argv, kernel="unstable", memory="2G" if quick else "6G",
                           timeout=1800 if quick else 6 * 3600, rwdir=rw)  # fmt: skip
        if (rw / "out").is_dir():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(rw / "out", out, dirs_exist_ok=True)
            print(f"results: {out / 'results.json'}, {out / 'report.md'}", flush=True)
        return res.returncode
    finally:
        shutil.rmtree(rw, ignore_errors=True)


def check_docs(names: tuple[str, ...], docs: Path = DOCS) -> None:
    """Refuse a --docs run that would drop a section of docs/BENCHMARKS.md: the page is
    rendered from docs/benchmarks/results.json and this run, so a section whose scenario
    is in neither (a page written before results.json was kept) would be lost."""
    page, kept = docs / "BENCHMARKS.md", docs / "benchmarks" / "results.json"
    if not page.is_file():
        return
    have = set(names)
    if kept.is_file():
        have |= set(json.loads(kept.read_text())["scenarios"])
    rendered = {report.section_title(report.SECTIONS[n]) for n in have if n in report.SECTIONS}
    by_title = {report.section_title(h): n for n, h in report.SECTIONS.items()}
    lost = [report.section_title(line) for line in page.read_text().splitlines()
            if line.startswith("## ") and report.section_title(line) not in rendered]  # fmt: skip
    if lost:
        more = sorted({by_title[t] for t in lost if t in by_title})
        raise UserError(
            f"--docs would drop from {page} what {kept} holds no run of: "
            + "; ".join(lost)
            + (f". Run those scenarios too (--scenario {' --scenario '.join(more)})" if more
               else ". Move those sections out of the page first")
            + ", or run without --docs")


def update_docs(out: Path, names: tuple[str, ...], docs: Path = DOCS) -> None:
    """docs/BENCHMARKS.md and its plots from this run's scenarios (``out``) and the latest
    run of every other one, which docs/benchmarks/results.json keeps: every scenario in one
    run takes hours under emulation.  Each section names the run it comes from."""
    pics, kept = docs / "benchmarks", docs / "benchmarks" / "results.json"
    new = json.loads((out / "results.json").read_text())
    merged: dict[str, Any] = (json.loads(kept.read_text()) if kept.is_file()
                              else {"scenarios": {}, "runs": {}})  # fmt: skip
    run = {k: new[k] for k in ("command", "quick", "started", "seconds", "environment",
                               "settings")}  # fmt: skip
    for name in names:
        merged["scenarios"][name] = new["scenarios"][name]
        merged["runs"][name] = run
    merged.update(run)  # the header's: the latest run
    rendered = Path(tempfile.mkdtemp(prefix="ublkmig-docs-"))
    try:
        md = report.write(merged, rendered)
        shutil.rmtree(pics, ignore_errors=True)
        pics.mkdir(parents=True)
        for png in rendered.glob("*.png"):
            shutil.copy(png, pics / png.name)
        kept.write_text(json.dumps(merged, indent=1) + "\n")
        (docs / "BENCHMARKS.md").write_text(md.replace("![](", "![](benchmarks/"))
    finally:
        shutil.rmtree(rendered, ignore_errors=True)
    print(f"updated {docs / 'BENCHMARKS.md'} ({', '.join(names)})", flush=True)


def environment(in_vm: bool, features: dict[str, Any]) -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    emulated = in_vm or "QEMU" in cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": mem / (1 << 30),
        "kernel": os.uname().release, "machine": platform.machine(), "emulated": emulated,
        "where": "in the kernel VM (virtme-ng, QEMU TCG: emulated, no KVM)" if in_vm
        else "natively",
        "data_path": features.get("data_path", "?"), "fio": _version(["fio", "--version"]),
    }  # fmt: skip


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "?"


def _features() -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "ublkmig", "features", "--json"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    if r.returncode != 0:
        raise UserError(f"ublkmig features failed: {r.stderr.strip()}")
    return dict(json.loads(r.stdout))


def _run_here(names: tuple[str, ...], quick: bool, out: Path, command: str, in_vm: bool) -> int:
    from ublkmig import daemon

    daemon.check_root()
    daemon.ensure_driver()
    s = scenarios.Settings.make(quick)
    features = _features()
    WORKDIR.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={3 * s.size + (512 << 20)}", "tmpfs",
                    str(WORKDIR)], check=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(dir=WORKDIR))
    started = time.time()
    results: dict[str, Any] = {
        "command": command, "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime(started)),
        "environment": environment(in_vm, features), "settings": s.__dict__, "scenarios": {},
    }  # fmt: skip
    try:
        for name in names:
            print(f"== {name}", flush=True)
            if name == "datapath":
                results["scenarios"][name] = scenarios.datapath(s, work, features)
            elif name == "idle":
                results["scenarios"][name] = scenarios.idle(s, work)
            elif name == "load":
                results["scenarios"][name] = scenarios.load(s, work)
            elif name == "large":
                results["scenarios"][name] = scenarios.load(s, work, large=True)
            elif name == "slow":
                results["scenarios"][name] = scenarios.slow(s, work)
            elif name == "yield":
                results["scenarios"][name] = scenarios.yielding(s, work)
            elif name == "qemu":
                results["scenarios"][name] = scenarios.load(s, work, peer=True)
                results["scenarios"][name]["differences"] = scenarios.PEER_DIFFERENCES
            # what is done so far, in case a later scenario fails or the run is stopped
            results["seconds"] = time.time() - started
            report.write(results, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["umount", str(WORKDIR)], capture_output=True)
    results["seconds"] = time.time() - started
    md = report.write(results, out)
    print(md, flush=True)
    if not in_vm:
        print(f"results: {out / 'results.json'}, {out / 'report.md'}", flush=True)
    return 0


def default_command() -> str:
    return shlex.join(["ublkmig", *sys.argv[1:]])
