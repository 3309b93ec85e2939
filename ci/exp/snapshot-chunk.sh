#!/bin/bash
# What a snapshot migration's copies on write cost the guest, by chunk size: 4k random
# writes at QD 32 on the first 32 MiB of a 256 MiB disk (tmpfs, the destination on the same
# tmpfs), unthrottled and at 2000 IOPS, 8 s with no migration, then 8 s with a snapshot
# migration at that --chunk-size (no speed limit; --no-cutover, so it never switches),
# cancelled after the window (the deltas folded back), REPS times each: every ratio
# compares two neighbouring windows of one boot.  A guest write to a chunk the active delta
# does not hold yet copies the whole chunk into it first (snapshot.c), on the queue thread.
# Each line: the chunk size, the load, the IOPS alone and with the migration, the ratio, the
# write p99 alone and with it (ms), the chunks copied on write in the window.  In the VM:
#   python -m ublkmig.vm run -- bash ci/exp/snapshot-chunk.sh
set -e
CHUNKS=${CHUNKS:-512K 1M}  # (snapshot mode takes no chunk below 512 KiB, the largest request)
REPS=${REPS:-2}
source "$(dirname "$0")/lib.sh"
serve_image 256
window() {  # window [RATE]: "IOPS p99-ms" of an 8 s fio run
  fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=32M --time_based --runtime=8 ${1:+--rate_iops=$1} \
      --output-format=json 2>/dev/null |
  python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.2f" % (j["iops"], j["clat_ns"]["percentile"]["99.000000"] / 1e6))'
}
mig() {  # a field of the running migration
  ublkmig status "$DEV" --json | python3 -c "import json,sys; m=json.load(sys.stdin)['migration'] or {}; print(m.get('$1'))"
}
printf '%-5s %-6s %7s %7s %6s %8s %8s %6s\n' chunk load alone with ratio p99-alone p99-with cows
for c in $CHUNKS; do
  for rate in "" 2000; do
    for r in $(seq "$REPS"); do
      read -r ia pa <<<"$(window $rate)"
      rm -f dst.img
      ublkmig migrate "$DEV" --to dst.img --mode snapshot --chunk-size "$c" --no-cutover >/dev/null
      read -r im pm <<<"$(window $rate)"
      cows=$(mig cow_chunks)
      ublkmig cancel "$DEV" >/dev/null 2>&1 || true
      for _ in $(seq 150); do
        case $(mig phase) in cancelled|failed|completed|None) break ;; esac
        sleep 0.2
      done
      printf '%-5s %-6s %7s %7s %6.2f %8s %8s %6s\n' "$c" "${rate:-max}" "$ia" "$im" \
        "$(python3 -c "print($im / max($ia, 1))")" "$pa" "$pm" "$cows"
    done
  done
done
ublkmig stop "$DEV" || true
