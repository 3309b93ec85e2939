#!/bin/bash
# The guest's cost of mirroring alone: 4k random writes at QD 32 on a 256 MiB disk served by
# ublkmig, before a migration, and while a mirror migration is in sync (--no-cutover: every
# write mirrored, the copier idle), then after a cancel. Run in the kernel VM:
#   python -m ublkmig.vm run -- bash ci/exp/mirror-cost.sh
set -e
source "$(dirname "$0")/lib.sh"
serve_image 256
echo "== before";  fiojob 10 128M
echo "== before";  fiojob 10 128M
for mode in mirror snapshot dbt; do
  ublkmig migrate "$DEV" --to "dst-$mode.img" --mode $mode --no-cutover --wait > mig.out 2>&1 || cat mig.out
  echo "== in sync, $mode (phase: $(ublkmig status "$DEV" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["migration"]["phase"])'))"
  fiojob 10 128M
  ublkmig cancel "$DEV" > /dev/null 2>&1 || true
  sleep 2
  echo "== after the cancel"; fiojob 10 128M
done
ublkmig stop "$DEV" || kill %1
