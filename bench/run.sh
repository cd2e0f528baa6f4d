#!/usr/bin/env bash
# kal's benchmarks. Usage: bash bench/run.sh [RUNS]   (default 3 runs each, medians reported)
#
# 1. alloc_bench.c: 2 threads x N malloc/free rounds through a few call levels; prints wall
#    ns per round. Plain, under `kal run` (a full stack captured for every allocation),
#    under valgrind --leak-check=full and under heaptrack.
# 2. memcached (Debian package) under memcaslap load for 10 s: TPS plain and under kal.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
ITERS=3000000
command -v memcached >/dev/null && command -v memcaslap >/dev/null && command -v heaptrack >/dev/null || {
  echo "installing memcached, libmemcached-tools, heaptrack, valgrind" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q memcached libmemcached-tools heaptrack valgrind >/dev/null
}
cargo build --release --workspace --quiet
KAL=target/release/kal
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gcc -O2 -g -pthread -o "$tmp/alloc_bench" bench/alloc_bench.c

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

echo "== alloc_bench: ns per malloc+free round (2 threads, $ITERS rounds each), median of $RUNS"
plain=(); kal=()
for i in $(seq "$RUNS"); do
  plain+=("$("$tmp/alloc_bench" 2 $ITERS)")
  kal+=("$($KAL run -q -- "$tmp/alloc_bench" 2 $ITERS)")
done
p=$(printf '%s\n' "${plain[@]}" | median); k=$(printf '%s\n' "${kal[@]}" | median)
echo "plain    : $p   (runs: ${plain[*]})"
echo "kal run  : $k   (runs: ${kal[*]})   ratio $(awk -v a="$k" -v b="$p" 'BEGIN{printf "%.2f", a/b}')x"
v=$(valgrind -q --leak-check=full "$tmp/alloc_bench" 2 $((ITERS / 20)) 2>/dev/null | tail -1)
echo "valgrind : $v   ratio $(awk -v a="$v" -v b="$p" 'BEGIN{printf "%.1f", a/b}')x  (1 run, $((ITERS / 20)) rounds)"
h=$(cd "$tmp" && heaptrack -o "$tmp/ht" "$tmp/alloc_bench" 2 $((ITERS / 5)) 2>/dev/null | grep -E '^[0-9.]+$' | tail -1)
echo "heaptrack: $h   ratio $(awk -v a="$h" -v b="$p" 'BEGIN{printf "%.1f", a/b}')x  (1 run, $((ITERS / 5)) rounds)"

echo "== memcached -t 1 under memcaslap (1 thread, 16 connections, 10 s): TPS, median of $RUNS"
port=11400
serve() { # $1: wrapper command ("" or "$KAL run -q --"); a fresh port each time
  port=$((port + 1))
  $1 memcached -p $port -U 0 -t 1 -m 256 -u root -P "$tmp/pid" &
  local pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  local tps
  tps=$(memcaslap -s 127.0.0.1:$port -t 10s -T 1 -c 16 2>&1 | sed -n 's/.*TPS: \([0-9]*\).*/\1/p' | tail -1)
  kill -INT "$(cat "$tmp/pid")" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "$tps"
}
mp=(); mk=()
for i in $(seq "$RUNS"); do
  mp+=("$(serve "")")
  mk+=("$(serve "$KAL run -q --error-exitcode 0 --")")
done
a=$(printf '%s\n' "${mp[@]}" | median); b=$(printf '%s\n' "${mk[@]}" | median)
echo "plain    : $a TPS  (runs: ${mp[*]})"
echo "kal run  : $b TPS  (runs: ${mk[*]})   throughput $(awk -v a="$b" -v b="$a" 'BEGIN{printf "%+.1f", (a/b-1)*100}')%"
