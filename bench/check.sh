#!/usr/bin/env bash
# Live-check benchmarks (issue 3). Usage: bash bench/check.sh [CHECKS]
# 1. A 1 GiB heap of 4 KB blocks (bench/big_heap.c) under `kal run`: CHECKS runs of
#    `kal check PID`, pause_ms and scan_ms (median and worst), against the target's RSS.
# 2. memcached under memcaslap load (20 s) while `kal run --check-every 1s` checks it:
#    pause per check (median, worst), TPS, get misses, and whether memcached survived.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKS=${1:-7}
command -v memcached >/dev/null && command -v memcaslap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q memcached libmemcached-tools >/dev/null
}
cargo build --release --workspace --quiet
KAL=target/release/kal
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; [ -n "${bh:-}" ] && kill "$bh" 2>/dev/null || true' EXIT
gcc -O2 -g -o "$tmp/big_heap" bench/big_heap.c

stats() { # reads numbers, prints "median M, worst W"
  sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "median %.2f, worst %.2f (n=%d)", m, a[NR], NR}'
}

echo "== 1 GiB heap of 4 KB blocks: $CHECKS x kal check"
$KAL run -q --error-exitcode 0 -- "$tmp/big_heap" 1024 > "$tmp/bh.out" &
for _ in $(seq 120); do grep -q ready "$tmp/bh.out" 2>/dev/null && break; sleep 0.5; done
bh=$(awk '{print $2}' "$tmp/bh.out")
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$bh/status")
: > "$tmp/pause"; : > "$tmp/scan"
for i in $(seq "$CHECKS"); do
  $KAL check "$bh" -q --json "$tmp/c.json" || true
  python3 -c "import json;d=json.load(open('$tmp/c.json'));print(d['pause_ms'])" >> "$tmp/pause"
  python3 -c "import json;d=json.load(open('$tmp/c.json'));print(d['scan_ms'])" >> "$tmp/scan"
done
kill "$bh"; bh=
gib=$(awk -v k="$rss_kib" 'BEGIN{printf "%.3f", k/1048576}')
echo "target RSS: $gib GiB"
echo "pause ms : $(stats < "$tmp/pause")"
echo "pause ms per GiB of RSS (median): $(sort -n "$tmp/pause" | awk -v g="$gib" '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m/g}')"
echo "scan ms  : $(stats < "$tmp/scan")"
echo "scan GiB/s (median): $(sort -n "$tmp/scan" | awk -v g="$gib" '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", g/(m/1000)}')"

echo "== memcached -t 2 under memcaslap (20 s) with kal run --check-every 1s"
port=11700
$KAL run -q --error-exitcode 0 --check-every 1s --json "$tmp/checks.jsonl" -- \
  memcached -p $port -U 0 -t 2 -m 256 -u root -P "$tmp/mc.pid" &
kalpid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
memcaslap -s 127.0.0.1:$port -t 20s -T 1 -c 16 > "$tmp/slap.out" 2>&1 || true
alive=no; kill -0 "$(cat "$tmp/mc.pid")" 2>/dev/null && alive=yes
kill -INT "$(cat "$tmp/mc.pid")" 2>/dev/null || true
wait "$kalpid" || true
python3 - "$tmp/checks.jsonl" > "$tmp/mcpause" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if "check" in d:
        print(d["pause_ms"])
PY
echo "checks: $(wc -l < "$tmp/mcpause"); pause ms: $(stats < "$tmp/mcpause")"
echo "memcaslap: $(grep -E 'TPS' "$tmp/slap.out" | tail -1)"
echo "get_misses: $(grep -E '^get_misses' "$tmp/slap.out" | tail -1 | awk '{print $2}'); memcached alive at the end of the load: $alive"
grep -iE 'error|fail|timeout' "$tmp/slap.out" | head -3 || true
