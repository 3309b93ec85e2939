#!/bin/bash
# Does a writer of big blocks on the same tmpfs file hold up 4k random writes (the inode
# lock)? Against one on another file. Run in the kernel VM:
#   python -m ublkmig.vm run -- bash ci/exp/same-file-writers.sh
set -e
mkdir -p /tmp/lk; mount -t tmpfs -o size=1G tmpfs /tmp/lk; cd /tmp/lk
dd if=/dev/zero of=x bs=1M count=256 status=none; dd if=/dev/zero of=y bs=1M count=256 status=none
A="--name=a --filename=x --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring --size=128M --time_based --runtime=8"
B() { echo "--name=b --filename=$1 --rw=write --bs=$2 --iodepth=4 --ioengine=io_uring --size=256M --time_based --runtime=8 --rate=${3}"; }
show() { python3 -c 'import json,sys; d=json.load(open("out.json"))
for j in d["jobs"]:
  w=j["write"]; p=w["clat_ns"].get("percentile",{}); print(j["jobname"], "iops %d MB/s %.0f p99 %.2f ms" % (w["iops"], w["bw"]/1024, p.get("99.000000",0)/1e6))'; }
echo "== 4k alone"; fio $A --output-format=json --output=out.json 2>&1 | tail -2; show
for bs in 1M 128k; do
echo "== 4k + $bs writer on the same file, 100 MB/s"; fio $A $(B x $bs 100m) --output-format=json --output=out.json 2>&1 | tail -2; show
echo "== 4k + $bs writer on another file, 100 MB/s"; fio $A $(B y $bs 100m) --output-format=json --output=out.json 2>&1 | tail -2; show
done
