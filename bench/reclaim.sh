#!/usr/bin/env bash
# Leak-tolerance benchmarks of the free mode (issue 4; parking: bench/park.sh).
# Usage: bash bench/reclaim.sh
# 1. The classic loop (malloc + memset 4,096,000 bytes every 100 ms, pointer dropped) for
#    20 s: peak RSS plain, and under `kal run --reclaim --check-every 1s`.
# 2. 100,000 leaked 64-byte blocks reclaimed by `kal reclaim PID` while the program spins:
#    the request's round trip, and the worst stall the program's own loop saw.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
KAL=target/release/kal
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gcc -O1 -g -o "$tmp/leak_loop" crates/kal/tests/programs/leak_loop.c
gcc -O1 -g -o "$tmp/stall" bench/stall.c

peak_rss() { # runs "$@" in the background, prints the peak RSS (MiB) of the newest leak_loop
  "$@" > /dev/null 2>&1 &
  local runner=$! peak=0 pid=""
  while kill -0 "$runner" 2>/dev/null; do
    pid=${pid:-$(pgrep -n -x leak_loop || true)}
    if [ -n "$pid" ]; then
      r=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      [ "${r:-0}" -gt "$peak" ] && peak=$r
    fi
    sleep 0.1
  done
  echo $((peak / 1024))
}
echo "== classic loop, 20 s: peak RSS (MiB)"
echo "plain                              : $(peak_rss "$tmp/leak_loop" 20)"
echo "kal run --reclaim=free --free-sites '*' --free-after 0s --check-every 1s : $(peak_rss $KAL run -q --error-exitcode 0 --reclaim=free --free-sites '*' --free-after 0s --check-every 1s -- "$tmp/leak_loop" 20)"

echo "== kal reclaim of 100,000 blocks"
$KAL run -q --error-exitcode 0 -- "$tmp/stall" 100000 > "$tmp/stall.out" &
for _ in $(seq 50); do grep -q ready "$tmp/stall.out" 2>/dev/null && break; sleep 0.1; done
pid=$(awk '/ready/ {print $2}' "$tmp/stall.out")
$KAL reclaim "$pid" -q --mode free --free-sites '*' --free-after 0s 2>&1 | tail -1
kill -USR1 "$pid"
sleep 0.5
grep "worst stall" "$tmp/stall.out"
