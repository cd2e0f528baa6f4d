#!/usr/bin/env bash
# Scan-speed benchmark (issue 7). Usage: bash bench/scan.sh [CHECKS] [MiB]
# Builds two heaps of MiB (default 1024) under `kal run` with bench/big_heap.c: one of
# 32-byte blocks (chains of 16 held by an array of heads, 1/1024 of the chains leaked) and
# one of 4 KB blocks (one array of pointers), then runs `kal check PID --json` CHECKS times
# (default 5) on each, with KAL_DEBUG_TIMING=1, and prints medians of:
#   scan_ms  the report's figure (table read + root copy + roots + marking/classifying),
#   mark_ms  the marking and classifying alone (kal::classify: roots, reach),
#   cpu_ms   on-CPU time of the thread doing roots and marking (the machine is shared:
#            wall times include waiting for a core),
# and blocks/s and GiB/s (blocks the agent recorded, their live bytes) over mark_ms and
# over scan_ms. If redis-server is installed, the same for redis-server with 1M keys
# (DEBUG POPULATE 1000000), and the wall time of the whole `kal check`.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKS=${1:-5}
MIB=${2:-1024}
# KAL=path/to/kal (with libkal_agent.so next to it) measures another build, e.g. an older one.
if [ -z "${KAL:-}" ]; then
  cargo build --release --workspace --quiet
  KAL=target/release/kal
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; [ -n "${bh:-}" ] && kill "$bh" 2>/dev/null || true' EXIT
gcc -O2 -g -o "$tmp/big_heap" bench/big_heap.c

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }

one_heap() { # SIZE: block size in bytes
  local size=$1
  echo "== $MIB MiB of $size-byte blocks: $CHECKS x kal check"
  $KAL run -q --error-exitcode 0 -- "$tmp/big_heap" "$MIB" "$size" \
    > "$tmp/bh.out" &
  for _ in $(seq 600); do grep -q ready "$tmp/bh.out" 2>/dev/null && break; sleep 0.5; done
  bh=$(awk '{print $2}' "$tmp/bh.out")
  echo "target RSS: $(awk '/VmRSS/ {printf "%.2f GiB", $2/1048576}' "/proc/$bh/status")"
  measure
  kill "$bh"; wait "$bh" 2>/dev/null || true; bh=
}

measure() { # kal check $bh, CHECKS times; prints medians
  : > "$tmp/scan"; : > "$tmp/mark"; : > "$tmp/cpu"; : > "$tmp/wall"
  for _ in $(seq "$CHECKS"); do
    local t0 t1
    t0=$(date +%s%N)
    KAL_DEBUG_TIMING=1 $KAL check "$bh" -q --json "$tmp/c.json" 2> "$tmp/err" || true
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000)) >> "$tmp/wall"
    python3 - "$tmp/c.json" >> "$tmp/scan" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["scan_ms"])
PY
    python3 - "$tmp/c.json" > "$tmp/live" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(d["summary"][k]["blocks"] for k in d["summary"]), d["memory"]["live_bytes"])
PY
    sed -n 's/^timing: .*mark \([0-9.]*\) ms.*/\1/p' "$tmp/err" >> "$tmp/mark"
    sed -n 's/^timing: .*on-CPU \([0-9.]*\) ms.*/\1/p' "$tmp/err" >> "$tmp/cpu"
    grep '^timing' "$tmp/err" | tr '\n' ';' | sed 's/;$/\n/' | sed 's/^/  /'
  done
  python3 - "$tmp/c.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("  last report summary:", json.dumps(d["summary"], separators=(",", ":")),
      "untracked:", d["untracked_allocations"])
PY
  local n bytes scan mark cpu
  read -r n bytes < "$tmp/live"
  scan=$(median < "$tmp/scan"); mark=$(median < "$tmp/mark"); cpu=$(median < "$tmp/cpu")
  echo "scan_ms runs: $(tr '\n' ' ' < "$tmp/scan")"
  echo "mark_ms runs: $(tr '\n' ' ' < "$tmp/mark")"
  echo "cpu_ms runs: $(tr '\n' ' ' < "$tmp/cpu")"
  echo "kal check wall ms runs: $(tr '\n' ' ' < "$tmp/wall"), median $(median < "$tmp/wall")"
  awk -v n="$n" -v b="$bytes" -v s="$scan" -v m="$mark" -v c="$cpu" 'BEGIN {
    printf "%d blocks, %.3f GiB live\n", n, b/1073741824
    printf "median scan_ms %.1f: %.2f M blocks/s, %.2f GiB/s\n", s, n/s/1e3, b/1073741824/(s/1e3)
    printf "median mark_ms %.1f: %.2f M blocks/s, %.2f GiB/s\n", m, n/m/1e3, b/1073741824/(m/1e3)
    if (c > 0) printf "median cpu_ms %.1f: %.2f M blocks/s, %.2f GiB/s\n", c, n/c/1e3, b/1073741824/(c/1e3)
  }'
}

one_heap 32
one_heap 4096

if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  port=6391
  echo "== redis-server with 1M keys (DEBUG POPULATE 1000000): $CHECKS x kal check"
  $KAL run -q --error-exitcode 0 -- redis-server --port $port \
    --save '' --appendonly no --enable-debug-command yes > "$tmp/redis.out" 2>&1 &
  for _ in $(seq 50); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p $port DEBUG POPULATE 1000000 > /dev/null
  bh=$(redis-cli -p $port INFO server | tr -d '\r' | awk -F: '/^process_id/ {print $2}')
  echo "target RSS: $(awk '/VmRSS/ {printf "%.2f GiB", $2/1048576}' "/proc/$bh/status")"
  measure
  redis-cli -p $port shutdown nosave > /dev/null 2>&1 || true
  bh=
fi
