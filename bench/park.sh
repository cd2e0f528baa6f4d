#!/usr/bin/env bash
# Parking benchmarks (issue 8). Usage: bash bench/park.sh
# 1 GiB of leaked 4 MiB blocks (256 of them) in a program that spins timing its own loop:
#   `kal reclaim PID` parks them (two snapshots, then one park request): the request's
#   time (the agent's work), RSS before and after, the three worst stalls the program saw
#   (the snapshots' fork pauses among them) and the worst while the agent parked (from the
#   agent's KAL_DEBUG_PARK line); then the program reads one byte of every page:
#   each first read of a parked run restores the whole run (256 pages).
# Run with compressible data (a pattern) and with random data (lz4 cannot shrink it; the
# store limit is raised so that everything parks).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
KAL=target/release/kal
tmp=$(mktemp -d)
pid=""
# Never leave a 1 GiB spinning program behind, whatever happens.
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
gcc -O2 -g -o "$tmp/stall" bench/stall.c

one() { # $1: fill (pattern|random); $2..: extra kal reclaim flags
  local fill=$1; shift
  : > "$tmp/stall.out"
  KAL_DEBUG_PARK=1 $KAL run -q --error-exitcode 0 -- "$tmp/stall" 256 4194304 "$fill" > "$tmp/stall.out" 2> "$tmp/agent.err" &
  for _ in $(seq 100); do grep -q ready "$tmp/stall.out" 2>/dev/null && break; sleep 0.1; done
  pid=$(awk '/ready/ {print $2}' "$tmp/stall.out")
  echo "== 1 GiB in 256 blocks of 4 MiB, $fill data"
  local t0 t1
  t0=$(date +%s.%N)
  $KAL reclaim "$pid" -q "$@" 2>&1 | tail -1
  t1=$(date +%s.%N)
  printf 'kal reclaim ran from %.3f to %.3f (unix s)\n' "$t0" "$t1"
  grep "park request" "$tmp/agent.err" || true
  kill -USR2 "$pid"
  for _ in $(seq 100); do grep -q touched "$tmp/stall.out" && break; sleep 0.1; done
  grep touched "$tmp/stall.out"
  echo "RSS after the reads: $(awk '/VmRSS/ {print int($2/1024)}' /proc/$pid/status) MiB"
  kill -USR1 "$pid"
  for _ in $(seq 100); do grep -q "worst stall" "$tmp/stall.out" && break; sleep 0.1; done
  grep -A1 "worst stall" "$tmp/stall.out"
  # The worst stall that began while the agent ran the park request.
  read -r p0 p1 < <(awk '/park request/ {print $(NF-9), $(NF-7)}' "$tmp/agent.err")
  awk -v a="$p0" -v b="$p1" '$1 == "stall" && $2 >= a && $2 <= b { n++; if ($3 > w) w = $3 }
    END { printf "during the park request: %d stalls over 500 us, the worst %d us\n", n, w }' "$tmp/stall.out"
  wait
}
one pattern
one random --park-limit 2G
