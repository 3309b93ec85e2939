#!/bin/bash
# What the guest keeps of its IOPS against how fast the copier goes: 4k random writes at QD 32
# on the first 32 MiB of a 384 MiB disk (a file on tmpfs), 10 s alone, then 10 s during a
# migration of each mode at a speed limit (--speed), then unlimited (the pacer alone decides),
# each cancelled after its 10 s.  The destination: a file on the same tmpfs, or with
# DEST=ram a brd RAM disk (/dev/ram0, written with O_DIRECT).  Run in the kernel VM:
#   python -m ublkmig.vm run -- [env DEST=ram] bash ci/exp/copier-share.sh [MODE...]
set -e
MODES=${*:-mirror}
source "$(dirname "$0")/lib.sh"
serve_image 384
DST=dst.img
if [ "${DEST:-}" = ram ]; then
  modprobe brd rd_nr=1 rd_size=$((384 * 1024)) max_part=0; DST=/dev/ram0
fi
mig() {  # the migration's copy and where the guest waited, from its status
  ublkmig status "$DEV" --json | python3 -c 'import json,sys; m=json.load(sys.stdin)["migration"]; w=m["guest_waits"]; print("  copied %d MiB in %.1f s, phase %s; guest waited: chunk %.1f s, dest %.1f s" % (m["bytes_copied"]>>20, m["elapsed"], m["phase"], w["chunk"], w["destination"]))'
}
echo "== alone"; fiojob 10
for mode in $MODES; do
  for speed in 2M 8M 32M unlimited; do
    extra=(); [ "$speed" = unlimited ] || extra=(--speed "$speed")
    [ "$DST" = dst.img ] && rm -f dst.img
    ublkmig migrate "$DEV" --to "$DST" --mode "$mode" "${extra[@]}" --no-cutover > mig.out 2>&1 || cat mig.out
    echo "== $mode at $speed/s"; fiojob 10; mig
    ublkmig cancel "$DEV" > /dev/null 2>&1 || true
    sleep 1
  done
  echo "== alone"; fiojob 10
done
ublkmig stop "$DEV" || true
