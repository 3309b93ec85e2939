#!/bin/bash
# The guest's share of its IOPS against what the migration does beside it, in pairs: 4k
# random writes at QD 32 on the first 32 MiB of a 256 MiB disk (a file on tmpfs, the
# destination a file on the same tmpfs), 8 s with no migration, then 8 s with one, REPS
# times for each case, so every ratio compares two neighbouring windows of one boot:
#   sync     a mirror migration in sync (--no-cutover, done copying): mirroring alone
#   2M 8M 32M a mirror migration copying at that --speed
#   pacer    a mirror migration copying with no limit (the pacer decides)
# Each line: the case, the IOPS alone and with the migration, the ratio, the daemon's CPU
# per guest I/O in each window (µs), what the copier copied.  Run in the kernel VM:
#   python -m ublkmig.vm run -- bash ci/exp/share-curve.sh [CASE...]
set -e
CASES=${*:-sync 2M 8M 32M pacer}
REPS=${REPS:-3}
source "$(dirname "$0")/lib.sh"
serve_image 256
cpu() { awk '{print $14 + $15}' /proc/$PID/stat; }
window() {  # window: "IOPS CPU-us-per-IO" of an 8 s fio run
  local c0 c1 out
  c0=$(cpu)
  out=$(fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=1 --size=32M --time_based --runtime=8 --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; print(j["iops"], j["total_ios"])')
  c1=$(cpu)
  python3 -c "import sys; i, n = map(float, '$out'.split()); print(f'{i:.0f} {($c1 - $c0) * 1e6 / $(getconf CLK_TCK) / max(n, 1):.0f}')"
}
start() {  # start CASE: the migration the case needs, ready for its window
  rm -f dst.img
  case $1 in
    sync) ublkmig migrate "$DEV" --to dst.img --mode mirror --no-cutover --wait >/dev/null ;;
    pacer) ublkmig migrate "$DEV" --to dst.img --mode mirror --no-cutover >/dev/null ;;
    *) ublkmig migrate "$DEV" --to dst.img --mode mirror --speed "$1" --no-cutover >/dev/null ;;
  esac
}
copied() {
  ublkmig status "$DEV" --json | python3 -c 'import json,sys; m=json.load(sys.stdin)["migration"]; print("%d MiB %s" % (m["bytes_copied"] >> 20, m["phase"]))'
}
printf '%-9s %7s %7s %6s %8s %8s  %s\n' case alone with ratio cpu-alone cpu-with copied
for c in $CASES; do
  for r in $(seq "$REPS"); do
    read -r ia ca <<<"$(window)"
    start "$c"
    read -r im cm <<<"$(window)"
    cp=$(copied)
    ublkmig cancel "$DEV" >/dev/null 2>&1 || true
    sleep 1
    printf '%-9s %7s %7s %6.2f %8s %8s  %s\n' "$c" "$ia" "$im" \
      "$(python3 -c "print($im / max($ia, 1))")" "$ca" "$cm" "$cp"
  done
done
ublkmig stop "$DEV" || true
