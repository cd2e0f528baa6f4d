#!/usr/bin/env bash
# Scale benchmarks (issue 9 "Scale"). Usage: bash bench/scale.sh [CHECKS]
# 1. 2,000 threads asleep (bench/threads.c) under `kal run`: CHECKS runs of `kal check`,
#    pause_ms and pause per thread (goal <= 20 us a thread); same for 1 thread as a base.
# 2. 200 forked children that leak and exit (bench/forkers.c): wall time plain vs under
#    `kal run` (goal <= 2x), and that every child's leak was reported.
# 3. A 20 GiB sparse mapping with 20 touched pages (bench/sparse.c) under `kal run`:
#    CHECKS runs of `kal check`, scan_ms (goal: proportional to touched pages), against
#    a 1 GiB mapping with the same 20 pages touched.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKS=${1:-5}
cargo build --release -p kal -p kal-agent --quiet
KAL=target/release/kal
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
for p in threads forkers sparse; do gcc -O2 -g -pthread -o "$tmp/$p" "bench/$p.c"; done

stats() { # reads numbers, prints "median M, worst W (n=N)"
  sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "median %.2f, worst %.2f (n=%d)", m, a[NR], NR}'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
field() { python3 -c "import json,sys;print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

# start NAME ARGS...: the program under kal run, its pid in $started once it is ready.
start() {
  local name=$1; shift
  $KAL run -q --error-exitcode 0 -- "$tmp/$name" "$@" > "$tmp/$name.out" &
  pids+=($!)
  for _ in $(seq 240); do grep -q ready "$tmp/$name.out" 2>/dev/null && break; sleep 0.25; done
  started=$(awk '/ready/ {print $2}' "$tmp/$name.out")
  pids+=("$started")
}

# checks PID TAG: CHECKS live checks; pause and scan ms in $tmp/TAG.pause, $tmp/TAG.scan.
checks() {
  : > "$tmp/$2.pause"; : > "$tmp/$2.scan"
  for _ in $(seq "$CHECKS"); do
    $KAL check "$1" -q --json "$tmp/c.json" || true
    field "$tmp/c.json" pause_ms >> "$tmp/$2.pause"
    field "$tmp/c.json" scan_ms >> "$tmp/$2.scan"
  done
}

echo "== threads: kal check of 1 and of 2000 sleeping threads, $CHECKS checks each"
for n in 1 2000; do
  start threads "$n"
  checks "$started" "t$n"
  echo "direct leaks found: $(python3 -c "import json;print(json.load(open('$tmp/c.json'))['summary']['direct'])")"
  kill "$started"
  echo "$n threads: pause ms $(stats < "$tmp/t$n.pause"); scan ms $(stats < "$tmp/t$n.scan")"
done
p1=$(median < "$tmp/t1.pause"); p2k=$(median < "$tmp/t2000.pause")
echo "pause per thread (median, (P2000 - P1) / 1999): $(awk -v a="$p1" -v b="$p2k" 'BEGIN{printf "%.1f us", (b-a)*1000/1999}')"

echo "== forkers: 200 children that leak and exit, plain vs kal run ($CHECKS runs each)"
: > "$tmp/plain"; : > "$tmp/kal"
for _ in $(seq "$CHECKS"); do
  s=$(date +%s.%N); "$tmp/forkers" 200; e=$(date +%s.%N)
  echo "$s $e" | awk '{print $2-$1}' >> "$tmp/plain"
  rm -f "$tmp"/f.json*
  s=$(date +%s.%N)
  $KAL run -q --error-exitcode 0 --json "$tmp/f.json" -- "$tmp/forkers" 200
  e=$(date +%s.%N)
  echo "$s $e" | awk '{print $2-$1}' >> "$tmp/kal"
done
echo "child reports (last run): $(ls "$tmp"/f.json.* | wc -l); their direct leaks, counted:"
for f in "$tmp"/f.json.*; do
  python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['summary']['direct'])" "$f"
done | sort | uniq -c
echo "plain s  : $(stats < "$tmp/plain")"
echo "kal run s: $(stats < "$tmp/kal")"
echo "ratio (medians): $(awk -v a="$(median < "$tmp/plain")" -v b="$(median < "$tmp/kal")" 'BEGIN{printf "%.1fx", b/a}')"

echo "== sparse: 20 touched pages in a 1 GiB and in a 20 GiB mapping, $CHECKS checks each"
for g in 1 20; do
  start sparse "$g" 20
  checks "$started" "s$g"
  kill "$started"
  echo "$g GiB: scan ms $(stats < "$tmp/s$g.scan"); pause ms $(stats < "$tmp/s$g.pause")"
done
