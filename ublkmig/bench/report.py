"""results.json → report.md (tables) and PNG plots (one per migration run under load)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MiB = 1 << 20


def _f(v: float | None, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def _run_line(r: dict[str, Any]) -> str:
    return (f"`{r['command']}` ({'quick smoke run' if r['quick'] else 'full settings'}), "
            f"{r['started']}, {r['seconds']:.0f} s")  # fmt: skip


def header(r: dict[str, Any]) -> list[str]:
    env = r["environment"]
    lines = ["# ublkmig benchmarks", ""]
    if r.get("runs"):  # sections from several runs (bench --docs): each names its own
        lines += ["Each section comes from the latest run of its scenario (ratios are "
                  "taken within one run):", ""]  # fmt: skip
        lines += [f"- {name}: {_run_line(run)}, Linux {run['environment']['kernel']}"
                  for name, run in r["runs"].items()]  # fmt: skip
        lines.append("")
    else:
        lines.append(f"- Command: {_run_line(r)}")
    lines += [
        f"- Machine: {env['cpu']}, {env['cpus']} CPUs, {env['memory_gib']:.1f} GiB",
        f"- Kernel: Linux {env['kernel']}, {env['where']}",
        f"- ublkmig data path: {env['data_path']}",
    ]
    if env["emulated"]:
        lines += ["",
                  "Under emulation (TCG) absolute figures mean little: read the ratios, "
                  "measured in the same boot."]  # fmt: skip
    return lines


def datapath_md(d: dict[str, Any], reps: int) -> list[str]:
    rows = d["rows"]
    out = ["", SECTIONS["datapath"], "",
           "fio, io_uring, direct, on a tmpfs file in the guest (both servers open it with "
           f"O_DIRECT too); median of {reps} "
           "(min–max); latency in µs; CPU: the server's user+system time per I/O "
           "(µs, ramp included); RSS: the server's peak resident memory (VmHWM) after "
           "every job, MiB.", ""]  # fmt: skip
    jobs = sorted({(r["queues"], r["job"]) for r in rows})
    for q, job in jobs:
        mine = [r for r in rows if r["job"] == job and r["queues"] == q]
        raw = next((r for r in mine if r["kind"] == "raw file"), None)
        ub = next((r for r in mine if r["kind"] == "ublkmig"), None)
        out += [f"**{job}** ({q} queue{'s' if q > 1 else ''})", "",
                "| target | IOPS (min–max) | MB/s | mean | p99 | p99.9 | CPU/IO | RSS "
                "| vs raw |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in mine:
            i = r["iops"]
            out.append(
                f"| {r['target']} | {i['median']:.0f} ({i['min']:.0f}–{i['max']:.0f}) "
                f"| {r['mbps']:.1f} | {r['lat_mean_us']:.0f} | {r['lat_p99_us']:.0f} "
                f"| {r['lat_p99.9_us']:.0f} | {_f(r['server_cpu_us_per_io'], '.1f')} "
                f"| {_mib(r.get('server_peak_rss'))} "
                f"| {_ratio(i['median'], raw['iops']['median'] if raw else None)} |"
            )
        kub = [r for r in mine if r["kind"].startswith("kublk")]
        if ub and kub:
            best = max(kub, key=lambda r: r["iops"]["median"])
            out.append("")
            out.append(f"ublkmig / {best['target']} (kublk's best): "
                       f"{_ratio(ub['iops']['median'], best['iops']['median'])}")  # fmt: skip
        out.append("")
    out += ["fio command (first target of each job):", ""]
    for q, job in jobs:
        r = next(r for r in rows if r["job"] == job and r["queues"] == q)
        out.append(f"    {' '.join(r['fio'][0])}")
    return out


def idle_md(d: dict[str, Any]) -> list[str]:
    out = ["", SECTIONS["idle"], "",
           "Time from the start to the cutover (the daemon's clock), against `dd` of the "
           "same image to the same filesystem with the same block size (best dd of the "
           "boot); median of the repetitions.", "",
           "| disk | mode | seconds (min–max) | vs dd | copied | skipped | final pause |",
           "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for disk in d["disks"]:
        alloc = f"{disk['disk']}, {disk['size'] // MiB} MiB ({disk['allocated'] // MiB} MiB data)"
        for mode, m in disk["modes"].items():
            sec = m["seconds"]
            pause = m["final_pause_ms"] if m["final_pause_ms"] is not None else \
                m["cutover_stall_ms"]  # fmt: skip
            out.append(f"| {alloc} | {mode} | {sec['median']:.2f} ({sec['min']:.2f}–"
                       f"{sec['max']:.2f}) | {m['vs_dd']:.2f} | "
                       f"{m['bytes_copied'] / MiB:.0f} MiB | {m['bytes_skipped'] / MiB:.0f} MiB "
                       f"| {_f(pause, '.1f')} ms |")  # fmt: skip
        out.append(f"| {alloc} | dd bs={disk['dd_bs']} | {disk['dd_seconds']['min']:.2f} "
                   "| 1.00 | | | |")  # fmt: skip
    return out


def load_md(d: dict[str, Any], title: str) -> list[str]:
    out = ["", title, "",
           f"fio on the first {d['span'] // MiB} MiB of a {d['size'] // MiB} MiB disk "
           "of random data; windows: before the migration, during it, after it. Latency (writes)"
           " in ms, from every I/O's completion record. Medians of the repetitions; the plot "
           "shows the first. RSS: the daemon's peak resident memory (VmHWM) at the end of the "
           "load, MiB. Pause: the final pass's (dbt, snapshot) or what the cutover held of guest"
           " I/O (mirror, auto: nothing since the cutover's window); stall: the slowest request "
           "within a second of the switch. Waited: where the guest's requests waited on the "
           "migration, as shares of their time in flight during it (the sum of their latencies):"
           " parked on a chunk being copied / waiting for the destination after the source was "
           "done / parked by a pause; the rest is the time the source itself took, slowed by the"
           " copier's work beside it. CPU/IO: the daemon's CPU time (every thread: queue, "
           "copier, io_uring workers) per guest I/O before / during the migration, µs. "
           "Written/B: the bytes the daemon wrote to storage during the migration per byte the"
           " guest wrote then (its writes, their mirrored copies, the copier's chunks, a "
           "snapshot's copies on write).", "",
           "| load | mode | seconds (min–max) | IOPS before / during / after "
           "| during/before (min–max) | p50 / p99 / p99.9 / max during | pause (stall) "
           "| waited: chunk / dest / pause | CPU/IO | written/B | RSS | plot |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in d["runs"]:
        b, w, a = r["windows"]["before"], r["windows"]["during"], r["windows"]["after"]
        pause = r["final_pause_ms"] if r["final_pause_ms"] is not None else \
            r.get("cutover_pause_ms")  # fmt: skip
        stall = f"{_f(pause, '.1f')} ms" + (f" ({_f(r['cutover_stall_ms'], '.1f')} ms)"
                                           if r.get("cutover_stall_ms") is not None else "")
        lat = " / ".join(_f(w.get(k), ".1f") for k in
                         ("lat_p50_ms", "lat_p99_ms", "lat_p99.9_ms", "lat_max_ms"))  # fmt: skip
        sp, rt = r["seconds_spread"], r["during_vs_before"]
        ratio = "-" if not rt else \
            f"{rt['median']:.2f} ({rt['min']:.2f}–{rt['max']:.2f})"  # fmt: skip
        if not r["converged"]:
            ratio += " (did not converge: cancelled)"
        out.append(f"| {r['job']} | {r['mode']} | {r['seconds']:.2f} ({sp['min']:.2f}–"
                   f"{sp['max']:.2f}) | {b['iops']:.0f} / {w['iops']:.0f} / {a['iops']:.0f} "
                   f"| {ratio} | {lat} | {stall} | {_waited(r)} | {_cpu(r)} "
                   f"| {_f(r.get('written_per_guest_byte'), '.2f')} "
                   f"| {_mib(r.get('daemon_peak_rss'))} | ![]({r.get('plot', '')}) |")  # fmt: skip
    if d.get("idle_seconds"):
        out += ["", "The same disk migrated idle, in the same boot (seconds, medians): "
                + ", ".join(f"{m} {t:.2f}" for m, t in d["idle_seconds"].items()) + "."]
    return out


# The guest's cost under load, as the project's goals put it: the share of its IOPS it
# keeps while the disk moves (by mode; 0.9 for every mode at 2000 IOPS), its write p99
# during against before, and the final pause of the modes that pause.
SHARE_UNTHROTTLED = {"auto": 0.5, "mirror": 0.5, "dbt": 0.6, "snapshot": 0.4}
SHARE_STEADY, P99_UNTHROTTLED, P99_STEADY = 0.9, 5.0, 3.0
PAUSE_MS, CUTOVER_PAUSE_MS, STEADY_VS_IDLE = 50.0, 1.0, 3.0


def targets_md(sc: dict[str, Any]) -> list[str]:
    """Each run of the load and large scenarios under the unthrottled and the 2000 IOPS
    loads against the goals: what was measured, the goal, and whether it holds.  A
    migration's time is set against its scenario's own idle migrations (``idle_seconds``,
    the same disk in the same boot)."""
    loads = [sc[k] for k in ("load", "large") if sc.get(k)]
    if not loads:
        return []
    out = ["", "**Against the goals** (unthrottled: the guest keeps at least "
           + ", ".join(f"{v} ({k})" for k, v in SHARE_UNTHROTTLED.items())
           + f" of its IOPS, write p99 at most {P99_UNTHROTTLED:.0f}x before; 2000 IOPS: "
           f"{SHARE_STEADY} in every mode, p99 at most {P99_STEADY:.0f}x before, the migration"
           f" at most {STEADY_VS_IDLE:.0f}x its time on the idle disk (the same disk, in the "
           f"same boot; auto: mirror's, which it is on an idle disk); dbt and snapshot pause "
           f"at most {PAUSE_MS:.0f} ms, mirror and auto hold under {CUTOVER_PAUSE_MS:.0f} ms "
           "at the cutover). ✓ holds, ✗ does not.", "",
           "| load | mode | IOPS share | p99 during/before | migration vs idle | pause |",
           "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for load in loads:
        idle = load.get("idle_seconds") or {}
        for r in load["runs"]:
            steady = r["job"].endswith("-2000iops")
            if r["job"] != "randwrite-4k-qd32" and not steady:
                continue
            out.append(_target_row(r, load["size"], steady,
                                   idle.get("mirror" if r["mode"] == "auto" else r["mode"])))
    return out


def _target_row(r: dict[str, Any], size: int, steady: bool, idle: float | None) -> str:
    share = (r["during_vs_before"] or {}).get("median")
    want = SHARE_STEADY if steady else SHARE_UNTHROTTLED.get(r["mode"])
    before, during = (r["windows"][w].get("lat_p99_ms") for w in ("before", "during"))
    p99 = during / before if before and during else None
    cells = [_judge(share, want, ".2f", at_least=True),
             _judge(p99, P99_STEADY if steady else P99_UNTHROTTLED, ".1f", "x"),
             _judge(r["seconds"] / idle if idle else None, STEADY_VS_IDLE if steady else None,
                    ".1f", "x")]  # fmt: skip
    if r["mode"] in ("dbt", "snapshot"):  # (their tails mirror: a cutover's pause)
        pause = r["final_pause_ms"] if r["final_pause_ms"] is not None else \
            r.get("cutover_pause_ms")  # fmt: skip
        cells.append(_judge(pause, PAUSE_MS, ".1f", " ms"))
    else:
        cells.append(_judge(r.get("cutover_pause_ms"), CUTOVER_PAUSE_MS, ".1f", " ms",
                            below=True))  # fmt: skip
    if not r["converged"]:
        cells[2] = "did not converge ✗"
    return f"| {r['job']}, {size // MiB} MiB disk | {r['mode']} | " + " | ".join(cells) + " |"


def _judge(v: float | None, limit: float | None, fmt: str, unit: str = "", *,
           at_least: bool = False, below: bool = False) -> str:  # fmt: skip
    """``v`` with its verdict against ``limit``: at most it (under it if ``below``; at least
    it if ``at_least``); no verdict without a limit."""
    if v is None:
        return "-"
    if limit is None:
        return f"{v:{fmt}}{unit}"
    ok = v >= limit if at_least else v < limit if below else v <= limit
    return f"{v:{fmt}}{unit} {'✓' if ok else '✗'}"


def _cpu(r: dict[str, Any]) -> str:
    cpu = r.get("cpu_us_per_io")
    return "-" if not cpu else " / ".join(_f(cpu.get(k), ".0f") for k in ("before", "during"))


def _waited(r: dict[str, Any]) -> str:
    """The guest's waits on the migration as shares of its request time during it."""
    waits, total = r.get("guest_waits"), r["windows"]["during"].get("request_seconds")
    if not waits or not total:
        return "-"
    return " / ".join(f"{100 * waits[k] / total:.0f}%" for k in ("chunk", "destination", "pause"))


# Each scenario's section of BENCHMARKS.md (``large`` is a part of ``load``'s).
SECTIONS = {"datapath": "## 1. Data path (no migration)", "idle": "## 2. Migration of an idle disk",
            "load": "## 3. Migration under load",
            "slow": "## 4. A slow destination: mirror against auto",
            "yield": "## 5. The copier yielding to guest I/O",
            "qemu": "## 6. The peer: QEMU's blockdev-mirror, same load"}  # fmt: skip


def section_title(heading: str) -> str:
    """A section's heading without its level and number ("## 3. X" -> "X")."""
    return heading.lstrip("#").strip().split(". ", 1)[-1]


def markdown(r: dict[str, Any]) -> str:
    lines = header(r)
    sc = r["scenarios"]
    if "datapath" in sc:
        lines += datapath_md(sc["datapath"], r["settings"]["reps"])
    if "idle" in sc:
        lines += idle_md(sc["idle"])
    if "load" in sc:
        lines += load_md(sc["load"], SECTIONS["load"])
    if "large" in sc:
        lines += load_md(sc["large"], "### The same load on a larger disk")
    lines += targets_md(sc)
    if "slow" in sc:
        d = sc["slow"]
        lines += load_md(d, SECTIONS["slow"])
        lines += ["", f"Every write to the destination waits {d['write_delay_ms']} ms. nbdkit: "
                  "an export (a file on the same tmpfs, over a unix socket) behind its delay "
                  "filter. dm-delay: a local block device (a loop device on a tmpfs file "
                  "behind device-mapper's delay target); there the image is served with "
                  "--direct, so the destination is written with O_DIRECT (the IOPS before "
                  "differ from the nbdkit rows for that reason). Fallbacks to dirty tracking "
                  "(first repetition): "
                  + ", ".join(f"{r['mode']} {r.get('fallbacks') or 0}" for r in d["runs"])
                  + "."]  # fmt: skip
    if "yield" in sc:
        d = sc["yield"]
        lines += load_md(d, SECTIONS["yield"])
        lines += ["", "Yielding (the default): while the guest has requests in flight the "
                  "copier copies 1 chunk at a time and rests between chunks as long as it "
                  "takes for the guest to keep 3/4 of its rate (measured while it rests), at "
                  "most 3 times as long as it copies; not yielding (--no-yield): 4 chunks at "
                  "a time, no rest. "
                  "Seconds the copier held back (median): "
                  + ", ".join(f"{r['mode']} {r.get('yielded_seconds') or 0:.2f}"
                              for r in d["runs"]) + "."]  # fmt: skip
    if "qemu" in sc:
        lines += load_md(sc["qemu"], SECTIONS["qemu"])
        lines += ["", sc["qemu"].get("differences", "")]
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], path: Path) -> None:
    """Guest IOPS and p99 latency over time, the migration's phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p[0] for p in run["series"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [p[1] for p in run["series"]], color="tab:blue", lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("guest IOPS", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, [p[2] for p in run["series"]], color="tab:red", lw=1)
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2.set_yscale("log")
    start = next((at for at, label in run["events"] if label == "start"), None)
    if start is not None:  # the migration, to its cutover
        ax.axvspan(start, start + run["seconds"], color="tab:orange", alpha=0.12, lw=0)
    for at, label in run["events"]:
        ax.axvline(at, color="grey", lw=0.6, ls="--")
        ax.annotate(label, (at, 1), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=6, va="top", ha="right", color="grey")  # fmt: skip
    ax.set_title(f"{run['mode']} under {run['job']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(r: dict[str, Any], out: Path) -> str:
    """results.json, the plots and report.md into ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    for key in ("load", "large", "slow", "yield", "qemu"):
        sc = r["scenarios"].get(key, {})
        for run in sc.get("runs", []):
            name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key}-{run['job']}-{run['mode']}") + ".png"
            plot(run, out / name)
            run["plot"] = name
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    md = markdown(r)
    (out / "report.md").write_text(md)
    return md
