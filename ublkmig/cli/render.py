"""A migration's status as text: the lines of ``ublkmig status``, the progress text and the
phase lines printed while following one."""

from __future__ import annotations

import time
from typing import Any

from ublkmig.migration.phase import ENDED
from ublkmig.units import format_duration, format_rate, format_size


def _percent(mig: dict[str, Any]) -> float:
    size = mig.get("size") or 0
    if mig.get("phase") == "completed" or not size:
        return 100.0 if mig.get("phase") == "completed" else 0.0
    return max(0.0, min(100.0, 100.0 * (size - mig.get("bytes_to_copy", size)) / size))


def _progress_text(mig: dict[str, Any]) -> str:
    parts = [
        f"{format_size(max(0, mig['size'] - mig['bytes_to_copy']))} of {format_size(mig['size'])}",
        f"{mig['dirty_chunks']} dirty",
    ]
    if mig["mode"] == "snapshot":
        parts.append(f"delta {mig['generation']}: {mig['delta_chunks']} chunks")
    if mig.get("rate"):
        parts.append(format_rate(mig["rate"]))
    if mig.get("eta_seconds") and mig["phase"] not in ENDED:
        parts.append(f"ETA {format_duration(mig['eta_seconds'])}")
    return ", ".join(parts)


def _phase_line(mig: dict[str, Any]) -> str:
    pass_no = f" (pass {mig['pass']}: {mig['pass_kind']})" if mig.get("pass") else ""
    return (
        f"{time.strftime('%H:%M:%S')} {mig['device']} {mig['mode']} {mig['phase']}{pass_no}: "
        f"{_progress_text(mig)}"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else format_duration(value / 1000)


def _status_lines(st: dict[str, Any]) -> list[str]:
    lines = [
        f"{st['path']}  {st['image']}  {format_size(st['size'])}  {st['state']}",
    ]
    io = st.get("stats") or {}
    mig = st.get("migration")
    gone = st.get("interrupted")
    if mig is None and gone and "damaged" in gone:
        lines.append(f"interrupted    a migration, whose saved state is damaged: {gone['damaged']}")
    elif mig is None and gone:
        lines.append(
            f"interrupted    {gone['mode']} migration to {gone['dest']} ({gone['phase']}) when "
            f"the last daemon died: `ublkmig migrate {st['path']} --resume` goes on with it"
        )
    elif mig is None:
        lines.append("no migration")
    else:
        pass_no = f", pass {mig['pass']} ({mig['pass_kind']})" if mig.get("pass") else ""
        lines += [
            f"migration      {mig['mode']} to {mig['dest']}: {mig['phase']}{pass_no}",
            f"progress       {_percent(mig):.1f}%: {_progress_text(mig)}",
            f"copied         {format_size(mig['bytes_copied'])} written, "
            f"{format_size(mig['bytes_skipped'])} skipped (holes, zeroes), "
            f"{format_size(mig['bytes_to_copy'])} to copy; cursor {format_size(mig['cursor'])}"
            + (f"; resumed: {format_size(mig['bytes_matched'])} already there"
               if mig.get("resumed") else ""),
            f"chunks         {mig['chunks_copied']} of {mig['chunks']} copied "
            f"({format_size(mig['chunk_size'])} each), {mig['dirty_chunks']} dirty, "
            f"{mig['hot_chunks']} hot",
        ]
        if mig["mode"] == "snapshot":
            lines.append(
                f"delta          generation {mig['generation']}, {mig['delta_chunks']} chunks"
            )
        limit = format_rate(mig["speed"]) if mig.get("speed") else "unlimited"
        eta = mig.get("eta_seconds")
        if mig["phase"] in ENDED:
            eta = None
        yielding = (
            f"yielded to guest I/O for {format_duration(mig.get('yielded_seconds', 0))}"
            if mig.get("busy_depth") else "not yielding to guest I/O"
        )
        lines.append(
            f"rate           {format_rate(mig['rate'])} (limit {limit}; {yielding}), "
            f"ETA {'-' if eta is None else format_duration(eta)}, "
            f"elapsed {format_duration(mig['elapsed'])}"
        )
        lines.append(
            f"guest writes   {mig['mirrored_writes']} mirrored, {mig['tracked_writes']} tracked, "
            f"{mig.get('ahead_writes', 0)} ahead of the copier, {mig['parked']} parked; "
            f"longest I/O {_ms(mig.get('max_latency_ms'))}"
        )
        if waits := mig.get("guest_waits"):
            lines.append(
                f"guest waited   {format_duration(waits['chunk'])} on chunks being copied, "
                f"{format_duration(waits['destination'])} for the destination, "
                f"{format_duration(waits['pause'])} paused (all requests together)"
            )
        if mig.get("cutover_pause_ms") is not None or mig.get("final_pause_ms") is not None:
            lines.append(
                f"switch         cutover pause {_ms(mig.get('cutover_pause_ms'))}, slowest "
                f"request around it {_ms(mig.get('cutover_stall_ms'))}, final pause "
                f"{_ms(mig.get('final_pause_ms'))}"
            )
        if mig.get("reconnects") or mig.get("dest_down"):
            lines.append(
                f"destination    {mig.get('dest_down', 0)} connections lost now, reconnected "
                f"{mig.get('reconnects', 0)} times"
            )
        if mig.get("verify_mismatches") is not None:
            lines.append(f"verify         {mig['verify_mismatches']} chunks differ")
        if mig.get("error"):
            lines.append(f"error          {mig['error']}")
        io = mig.get("io") or io
    dev_io = st.get("stats") or {}
    if dev_io.get("conn_down") or dev_io.get("conn_waits") or st.get("reconnects"):
        lines.append(
            f"connection     {dev_io.get('conn_down', 0)} lost now, reconnected "
            f"{st.get('reconnects', 0)} times; guest requests waiting "
            f"{dev_io.get('conn_waiting', 0)} now, {dev_io.get('conn_waits', 0)} in all, "
            f"{dev_io.get('conn_failed', 0)} failed after --reconnect-wait"
        )
    if io:
        keys = ("reads", "writes", "flushes", "discards", "write_zeroes", "errors", "inflight",
                "parked")  # fmt: skip
        lines.append("guest I/O      " + ", ".join(f"{k} {io[k]}" for k in keys if k in io))
    return lines
