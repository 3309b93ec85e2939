#!/bin/bash
# What the bench's own watching costs the guest, and how long a migration takes to start.
# 4k random writes at QD 32 on a 128 MiB disk served by ublkmig (a mirror migration in sync,
# --no-cutover, so status has a migration to report), 10 s each: alone, then with a client
# asking for the status every 50 ms (what the bench's follow() does during a migration
# only), every 250 ms, alone again.  Then, under the same load, the time from the migrate
# request to its answer and to the first status in the copying phase.  Run in the kernel VM:
#   python -m ublkmig.vm run -- bash ci/exp/observer-cost.sh
set -e
source "$(dirname "$0")/lib.sh"
serve_image 128
poll() {  # poll INTERVAL SECONDS: status requests, as the bench's follow() makes them
  python3 - "$DEV" "$1" "$2" <<'EOF'
import sys, time
from ublkmig.client import Client
dev, every, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
c, n, t0 = Client(dev, timeout=30.0), 0, time.monotonic()
while time.monotonic() - t0 < secs:
    c.status(); n += 1
    time.sleep(every)
print(f"  ({n} status requests in {secs:.0f} s)")
EOF
}
start_under_load() {  # the time from a migrate request to its answer and to copying
  fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=32M --time_based --runtime=30 > /dev/null 2>&1 &
  F=$!; sleep 3
  python3 - "$DEV" "$W/dst2.img" <<'EOF2'
import sys, time
from ublkmig.bench.scenarios.common import migrate_request
from ublkmig.client import Client
dev, dest = sys.argv[1], sys.argv[2]
c = Client(dev, timeout=30.0)
t0 = time.monotonic()
c.migrate(migrate_request(dest, "mirror"))
t1 = time.monotonic()
print(f"  migrate answered after {t1 - t0:.3f} s")
while True:
    st = c.status().get("migration") or {}
    if st.get("phase") not in (None, "starting"):
        break
    time.sleep(0.01)
print(f"  phase {st.get('phase')} seen after {time.monotonic() - t0:.3f} s")
c.cancel()
EOF2
  kill $F 2>/dev/null || true; wait $F 2>/dev/null || true
  sleep 2; rm -f "$W/dst2.img"
}
echo "== the daemon's first migration's start under the load"; start_under_load
echo "== its second's"; start_under_load
ublkmig migrate "$DEV" --to dst.img --mode mirror --no-cutover --wait > mig.out 2>&1 || cat mig.out
echo "== in sync, nobody asking";        fiojob 10
echo "== in sync, status every 50 ms";   poll 0.05 11 & P=$!; fiojob 10; wait $P
echo "== in sync, status every 250 ms";  poll 0.25 11 & P=$!; fiojob 10; wait $P
echo "== in sync, nobody asking";        fiojob 10
echo "== in sync, status every 50 ms";   poll 0.05 11 & P=$!; fiojob 10; wait $P
echo "== in sync, nobody asking";        fiojob 10
ublkmig cancel "$DEV" > /dev/null 2>&1 || true
ublkmig stop "$DEV" || true
