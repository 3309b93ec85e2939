#!/bin/bash
# Where the daemon's writes to tmpfs files run: io_uring workers (iou-wrk threads) or inline,
# while serving a 4k random write load, and during a mirror migration to another tmpfs file.
# Run in the kernel VM: python -m ublkmig.vm run -- bash ci/exp/iowq.sh
set -e
source "$(dirname "$0")/lib.sh"
serve_image 256
SPID=$PID
threads() { for t in /proc/$SPID/task/*; do cat $t/comm; done | sed 's/-[0-9]*$//' | sort | uniq -c | tr '\n' ' '; echo; }
schedstat() { for t in /proc/$SPID/task/*; do echo "$(cat $t/comm) $(cut -d' ' -f1 $t/schedstat)"; done | sed 's/-[0-9]* / /' | awk '{s[$1]+=$2} END {for (k in s) printf "%s %.2fs  ", k, s[k]/1e9; print ""}'; }
echo "idle: $(threads)"
fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=32M --time_based --runtime=30 --output=fio.json --output-format=json &
FPID=$!
sleep 4; echo "serving, load: $(threads)"; schedstat
sleep 4; echo "serving, load 4 s later:"; schedstat
ublkmig migrate "$DEV" --to dst.img --mode mirror --wait > mig.out 2>&1 &
MPID=$!
for i in 1 2 3 4 5 6; do sleep 1.5; echo "migrating: $(threads)"; schedstat; done
wait $MPID || true; cat mig.out | tail -2
kill $FPID 2>/dev/null || true; wait $FPID 2>/dev/null || true
ublkmig stop "$DEV" || kill $SPID
