#!/usr/bin/env bash
# Agentless live check (issue 11). Usage: bash bench/agentless.sh [CHECKS]
# A 1 GiB heap of 4 KB blocks (bench/big_heap.c, all reachable) started WITHOUT kal:
# CHECKS runs of `kal check PID` (heap walk of glibc's arenas in the snapshot copy, then
# the scan), pause_ms and scan_ms (median and worst) against the target's RSS, and the
# heap walk's own time and kal's on-CPU time for walk + scan (KAL_DEBUG_TIMING: what the
# check costs whatever else the machine runs); then the same program under `kal run`,
# checked as many times, for the agent's figures at the same moment.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKS=${1:-7}
cargo build --release -p kal -p kal-agent --quiet
KAL=target/release/kal
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; [ -n "${bh:-}" ] && kill "$bh" 2>/dev/null || true' EXIT
gcc -O2 -g -o "$tmp/big_heap" bench/big_heap.c

stats() { # reads numbers, prints "median M, worst W"
  sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "median %.2f, worst %.2f (n=%d)", m, a[NR], NR}'
}

echo "== 1 GiB heap of 4 KB blocks, started without kal: $CHECKS x kal check"
"$tmp/big_heap" 1024 > "$tmp/bh.out" &
bh=$!
for _ in $(seq 120); do grep -q ready "$tmp/bh.out" 2>/dev/null && break; sleep 0.5; done
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$bh/status")
: > "$tmp/pause"; : > "$tmp/scan"; : > "$tmp/walk"; : > "$tmp/cpu"
for i in $(seq "$CHECKS"); do
  KAL_DEBUG_TIMING=1 $KAL check "$bh" -q --json "$tmp/c.json" 2> "$tmp/err" || true
  sed -n 's/.*timing: heap walk \([0-9.]*\)\(m\?s\).*/\1 \2/p' "$tmp/err" |
    awk '{print ($2 == "s") ? $1 * 1000 : $1}' >> "$tmp/walk"
  sed -n 's/.*on-CPU \([0-9.]*\) ms.*/\1/p' "$tmp/err" | awk '{s += $1} END {print s}' >> "$tmp/cpu"
  python3 - "$tmp/c.json" "$tmp" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
assert s["direct"]["blocks"] == 0 and s["indirect"]["blocks"] == 0, s
open(sys.argv[2] + "/pause", "a").write(f"{d['pause_ms']}\n")
open(sys.argv[2] + "/scan", "a").write(f"{d['scan_ms']}\n")
open(sys.argv[2] + "/blocks", "w").write(f"{s['reachable']['blocks']}\n")
PY
done
kill "$bh"; bh=
gib=$(awk -v k="$rss_kib" 'BEGIN{printf "%.3f", k/1048576}')
echo "target RSS: $gib GiB; reachable blocks: $(cat "$tmp/blocks")"
echo "pause ms : $(stats < "$tmp/pause")"
echo "pause ms per GiB of RSS (median): $(sort -n "$tmp/pause" | awk -v g="$gib" '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m/g}')"
echo "heap walk ms: $(stats < "$tmp/walk")"
echo "scan ms (walk + roots + marking) : $(stats < "$tmp/scan")"
echo "scan GiB/s (median): $(sort -n "$tmp/scan" | awk -v g="$gib" '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", g/(m/1000)}')"
echo "kal on-CPU ms (walk + roots + marking): $(stats < "$tmp/cpu")"
echo "on-CPU GiB/s (median): $(sort -n "$tmp/cpu" | awk -v g="$gib" '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", g/(m/1000)}')"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"

echo "== the same under kal run (the agent's table): $CHECKS x kal check"
$KAL run -q --error-exitcode 0 -- "$tmp/big_heap" 1024 > "$tmp/bh.out" 2>/dev/null &
for _ in $(seq 120); do grep -q ready "$tmp/bh.out" 2>/dev/null && break; sleep 0.5; done
bh=$(awk '{print $2}' "$tmp/bh.out")
: > "$tmp/pause"; : > "$tmp/scan"
for i in $(seq "$CHECKS"); do
  $KAL check "$bh" -q --json "$tmp/c.json" || true
  python3 -c "import json;d=json.load(open('$tmp/c.json'));print(d['pause_ms'])" >> "$tmp/pause"
  python3 -c "import json;d=json.load(open('$tmp/c.json'));print(d['scan_ms'])" >> "$tmp/scan"
done
kill "$bh"; bh=
echo "pause ms : $(stats < "$tmp/pause")"
echo "scan ms (table + roots + marking) : $(stats < "$tmp/scan")"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
