#!/bin/bash
# The guest's cost of mirroring alone: 4k random writes at QD 32 on a 256 MiB disk served by
# ublkmig, before a migration, and while a mirror migration is in sync (--no-cutover: every
# write mirrored, the copier idle), then after a cancel. Run in the kernel VM:
#   python -m ublkmig.vm run -- bash ci/exp/mirror-cost.sh
set -e
export PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"
W=$(mktemp -d /tmp/exp.XXXX); cd "$W"
dd if=/dev/urandom of=src.img bs=1M count=256 status=none
ublkmig serve src.img > serve.out 2> serve.err &
for i in $(seq 100); do [ -s serve.out ] && break; sleep 0.2; done
DEV=$(head -1 serve.out); echo "device $DEV"
echo none > /sys/block/$(basename "$DEV")/queue/scheduler || true
fiojob() {
  fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=128M --time_based --runtime="$1" --output-format=json 2>/dev/null |
  python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; p=j["clat_ns"]["percentile"]; print("iops %d p50 %.2f ms p99 %.2f ms" % (j["iops"], p["50.000000"]/1e6, p["99.000000"]/1e6))'
}
echo "== before";  fiojob 10
echo "== before";  fiojob 10
for mode in mirror snapshot dbt; do
  ublkmig migrate "$DEV" --to "dst-$mode.img" --mode $mode --no-cutover --wait > mig.out 2>&1 || cat mig.out
  echo "== in sync, $mode (phase: $(ublkmig status "$DEV" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["migration"]["phase"])'))"
  fiojob 10
  ublkmig cancel "$DEV" > /dev/null 2>&1 || true
  sleep 2
  echo "== after the cancel"; fiojob 10
done
ublkmig stop "$DEV" || kill %1
