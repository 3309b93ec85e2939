"""A migration's phases (``status``'s ``phase``, one ``migration.phase`` log event per change).

Imports neither anyio nor the machine: the CLI and the bench compare the phases of the
``status`` answers they read (plain strings, equal to these).
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    STARTING = "starting"  # opening the destination, routing guest I/O through the migration
    COPYING = "copying"  # the first full pass (mirror: the only one)
    DIRTY_PASSES = "dirty-passes"  # dbt: passes over the dirty chunks
    FOLDING = "folding"  # snapshot: freeze the delta, fold it into the destination
    IN_SYNC = "in-sync"  # --no-cutover: kept in sync until `cutover`
    # the last chunks copied: dbt with the guest's writes mirrored, snapshot with its I/O paused
    FINAL_PASS = "final-pass"
    VERIFYING = "verifying"  # --verify: guest I/O paused, destination compared
    RECONNECTING = "reconnecting"  # connections to the destination lost: dialling again
    CUTOVER = "cutover"  # switched to the destination (measuring the stall)
    COMPLETED = "completed"  # the device serves from the destination
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"  # the device serves from the source, untouched
    FAILED = "failed"  # the device serves from the source; see error


# the migration is over (a str from a status answer is in it as well as a Phase)
ENDED = frozenset({Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED})
# the copy is not in sync yet
SYNCING = frozenset({Phase.STARTING, Phase.COPYING, Phase.DIRTY_PASSES, Phase.FOLDING,
                     Phase.RECONNECTING})  # fmt: skip
