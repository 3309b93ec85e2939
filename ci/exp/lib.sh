# Sourced by the experiments in ci/exp (each run in the kernel VM: python -m ublkmig.vm run
# -- bash ci/exp/NAME.sh): the project's venv on PATH, a fresh work folder as the current
# one, a served image, and the guest's load.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
W=$(mktemp -d /tmp/exp.XXXX)
cd "$W"

# serve_image MIB: MIB MiB of random data in src.img, served by ublkmig; sets DEV (the
# device) and PID (the daemon), and gives the device no I/O scheduler
serve_image() {
  dd if=/dev/urandom of=src.img bs=1M count="$1" status=none
  ublkmig serve src.img > serve.out 2> serve.err &
  PID=$!
  for _ in $(seq 100); do [ -s serve.out ] && break; sleep 0.2; done
  DEV=$(head -1 serve.out)
  echo "device $DEV"
  echo none > "/sys/block/$(basename "$DEV")/queue/scheduler" || true
}

# fiojob SECONDS [SPAN]: 4k random writes at QD 32 over the first SPAN (default 32M) of
# DEV; prints the IOPS and the write latency's p50 and p99
fiojob() {
  fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size="${2:-32M}" --time_based --runtime="$1" --output-format=json 2>/dev/null |
  python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; p=j["clat_ns"]["percentile"]; print("iops %d p50 %.2f ms p99 %.2f ms" % (j["iops"], p["50.000000"]/1e6, p["99.000000"]/1e6))'
}
