#!/bin/bash
# Attach benchmarks (issue 12): attach pause on a 1 GiB process, and alloc_bench before
# attach, attached, after detach, against plain runs and kal run.
# Usage: bench/attach.sh [ROUNDS]   (from the repository root, after cargo build --release)
set -e
KAL=${KAL:-target/release/kal}
N=${1:-5}
T=$(mktemp -d)
gcc -O2 -o "$T/big_heap" bench/big_heap.c
gcc -O2 -pthread -o "$T/alloc_bench" bench/alloc_bench.c
echo "== attach pause, 1 GiB heap of 4 KiB blocks (fresh process each round)"
for i in $(seq "$N"); do
  mkfifo "$T/in$i"
  "$T/big_heap" 1024 < "$T/in$i" > "$T/out$i" & bp=$!
  exec 3> "$T/in$i"
  until grep -q ready "$T/out$i" 2>/dev/null; do sleep 0.1; done
  "$KAL" attach $bp | grep -o 'paused [0-9.]* ms'
  "$KAL" detach $bp > /dev/null
  exec 3>&-
  kill $bp; wait $bp 2>/dev/null || true
done
echo "== alloc_bench 2 threads x 5M: plain / kal run"
for i in $(seq "$N"); do
  echo "plain $("$T/alloc_bench" 2 5000000)  kal-run $("$KAL" run --quiet -- "$T/alloc_bench" 2 5000000 2>/dev/null)"
done
echo "== alloc_bench in one process: before attach / attached / after detach (ns per round)"
for i in $(seq "$N"); do
  mkfifo "$T/p$i"
  ALLOC_BENCH_PHASES=3 "$T/alloc_bench" 2 5000000 < "$T/p$i" > "$T/r$i" & ap=$!
  exec 4> "$T/p$i"
  until grep -q ready "$T/r$i" 2>/dev/null; do sleep 0.05; done
  echo >&4; until [ "$(wc -l < "$T/r$i")" -ge 2 ]; do sleep 0.05; done
  "$KAL" attach $ap > /dev/null
  echo >&4; until [ "$(wc -l < "$T/r$i")" -ge 3 ]; do sleep 0.05; done
  "$KAL" detach $ap > /dev/null
  echo >&4; exec 4>&-; wait $ap
  echo "$(sed -n 2,4p "$T/r$i" | tr '\n' ' ')"
done
rm -rf "$T"
