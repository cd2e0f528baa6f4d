#!/usr/bin/env bash
# A `kal check` of redis-server with 1M keys, builds compared (issue 7).
# Usage: bash bench/redis_check.sh [RUNS] [KAL...]
#
# Starts redis-server (Debian, jemalloc) under the first KAL (default: this tree's release
# build), loads it with `DEBUG POPULATE 1000000`, then runs
# `KAL_DEBUG_TIMING=1 /usr/bin/time KAL check PID -q --json FILE` RUNS times (default 7)
# with each KAL in turn (alternated: the machine is shared and noisy), and prints per build
# the medians of: the whole check's wall time and CPU time (user + sys, all threads), the
# table read, the marking (`mark` of the timing line: roots, marking, lost blocks) and the
# report, in ms; and the classes of the last run (they must not differ between builds).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-7}
shift || true
if [ $# -eq 0 ]; then
  cargo build --release --workspace --quiet
  set -- "$PWD/target/release/kal"
fi
command -v redis-server >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >/dev/null
}
tmp=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
port=$((7000 + RANDOM % 1000))
"$1" run -q -- redis-server --port "$port" --save '' --appendonly no \
  --enable-debug-command yes > "$tmp/redis.out" 2>&1 &
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$port" DEBUG POPULATE 1000000 >/dev/null
sleep 2
server=$(pgrep -f "redis-server \*:$port" | head -1)

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }

for r in $(seq "$RUNS"); do
  for k in $(seq $#); do
    kal=${!k}
    KAL_DEBUG_TIMING=1 /usr/bin/time -f "time %e %U %S" "$kal" check "$server" -q \
      --json "$tmp/$k.json" > /dev/null 2> "$tmp/err" || { cat "$tmp/err" >&2; true; }
    awk '/^time /{printf "%.0f %.0f\n", $2*1000, ($3+$4)*1000}' "$tmp/err" >> "$tmp/$k.time"
    sed -n 's/^timing: table read \([0-9.]*\)\(m\?s\).*/\1 \2/p' "$tmp/err" |
      awk '{print ($2=="s") ? $1*1000 : $1}' >> "$tmp/$k.table"
    sed -n 's/^timing: roots [0-9.]* ms, mark \([0-9.]*\) ms.*/\1/p' "$tmp/err" >> "$tmp/$k.mark"
    sed -n 's/^timing: report built in \([0-9.]*\) ms.*/\1/p' "$tmp/err" >> "$tmp/$k.report"
  done
done
echo "redis-server, $(redis-cli -p "$port" dbsize) keys; $RUNS alternated runs; medians in ms"
echo "| build | wall | CPU (user+sys) | table read | marking | report | classes (direct, indirect, possible, reachable) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for k in $(seq $#); do
  wall=$(awk '{print $1}' "$tmp/$k.time" | median)
  cpu=$(awk '{print $2}' "$tmp/$k.time" | median)
  classes=$(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print(', '.join(str(s[c]['blocks']) for c in ('direct','indirect','possible','reachable')))" "$tmp/$k.json")
  echo "| ${!k} | $wall | $cpu | $(median < "$tmp/$k.table") | $(median < "$tmp/$k.mark") | $(median < "$tmp/$k.report") | $classes |"
done
