#!/usr/bin/env bash
# Issue 9 item 1, at scale: SIGKILL `kal check` and `kal reclaim` at N random instants
# against a self-verifying target of GIB GiB (bench/kill_target.c under `kal run`), and
# count what harms the target: deaths, corruption, copies or zombies left in it, a tracer
# or a stop left behind. Not a CI test: it is long (about N x 0.5 s at 2 GiB).
# Usage: bash bench/kill_stress.sh [N] [GIB]      (defaults: 1000, 2)
# Each kill: the command (check or reclaim, alternately) is started, killed with SIGKILL
# after a random delay, then reaped. The delay is drawn uniformly from [0, 1.2 x the
# command's uninterrupted duration] (measured at the start) for half the kills, and from
# its first eighth for the other half: the freeze, the injected fork and the copy's
# making (the windows of issue 9 item 1) come early, the long scan of the copy after. After each kill the target must be alive; every 25 kills and at
# the end, once things have settled, it must be untraced, not stopped and without
# children (a snapshot copy or a zombie of one).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
GIB=${2:-2}
cargo build --release -p kal -p kal-agent --quiet
tmp=$(mktemp -d)
# A private copy of kal and its agent: a rebuild meanwhile does not change what runs.
cp target/release/kal target/release/libkal_agent.so "$tmp/"
KAL=$tmp/kal
gcc -O2 -g -o "$tmp/target" bench/kill_target.c
runner=
trap 'kill "$runner" 2>/dev/null || true; kill "$(cat "$tmp/pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$tmp"' EXIT

deaths=0 corrupt=0 worst_children=0 left_traced=0 left_stopped=0
start_target() {
  : > "$tmp/out"
  $KAL run -q --error-exitcode 0 -- "$tmp/target" $((GIB * 1024)) > "$tmp/out" 2>/dev/null &
  runner=$!
  for _ in $(seq 600); do grep -q ready "$tmp/out" && break; sleep 0.1; done
  awk '/ready/ {print $2}' "$tmp/out" > "$tmp/pid"
  pid=$(cat "$tmp/pid")
  [ -n "$pid" ] || { echo "the target did not start"; exit 1; }
}
status_field() { awk -v f="$1" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null; }
children() { cat /proc/"$pid"/task/*/children 2>/dev/null | wc -w; }
# settle: wait (up to 5 s) for the target to be untraced, running and childless; count
# what is left.
settle() {
  local t
  for _ in $(seq 100); do
    t=$(status_field TracerPid:)
    if [ "${t:-0}" = 0 ] && [ "$(children)" = 0 ] && ! status_field State: | grep -q '^[tT]'; then
      return
    fi
    sleep 0.05
  done
  t=$(status_field TracerPid:)
  [ "${t:-0}" != 0 ] && left_traced=$((left_traced + 1))
  status_field State: | grep -q '^[tT]' && left_stopped=$((left_stopped + 1))
  local c; c=$(children)
  [ "$c" -gt "$worst_children" ] && worst_children=$c
  echo "kill $i: left behind: tracer ${t:-?}, state $(status_field State:), $c children"
}
alive_and_sound() {
  if grep -q CORRUPT "$tmp/out"; then
    corrupt=$((corrupt + 1))
    echo "kill $i: the target's data changed (CORRUPT)"
  fi
  if ! kill -0 "$pid" 2>/dev/null || grep -q '^[Z]' <(status_field State:); then
    deaths=$((deaths + 1))
    wait "$runner" 2>/dev/null || true
    echo "kill $i: the target died; kal run said: $(tail -c 300 "$tmp/out" | tr '\n' ' ')"
    start_target
  fi
}

start_target
echo "target: pid $pid, $GIB GiB, $(awk '/VmRSS/ {print $2}' /proc/"$pid"/status) KiB resident"
# How long each command takes when left alone (median of 3): the kill window.
dur() {
  for _ in 1 2 3; do
    local s e
    s=$(date +%s%N)
    $KAL "$@" "$pid" -q > /dev/null 2>&1 || true
    e=$(date +%s%N)
    echo $(((e - s) / 1000))
  done | sort -n | sed -n 2p
}
check_us=$(dur check)
reclaim_us=$(dur reclaim)
echo "uninterrupted: check ${check_us} us, reclaim ${reclaim_us} us (median of 3)"

seed=${SEED:-12345}
RANDOM=$seed
t0=$(date +%s)
for i in $(seq "$N"); do
  if [ $((i % 2)) = 1 ]; then cmd=check; window=$check_us; else cmd=reclaim; window=$reclaim_us; fi
  # Uniform in [0, 1.2 x window] or [0, window / 8] microseconds (two 15-bit draws).
  r=$(((RANDOM << 15) | RANDOM))
  if [ $(((i + 1) / 2 % 2)) = 0 ]; then span=$((window * 12 / 10)); else span=$((window / 8)); fi
  delay=$((r % (span + 1)))
  $KAL $cmd "$pid" -q > /dev/null 2>&1 &
  k=$!
  sleep "$(printf '%d.%06d' $((delay / 1000000)) $((delay % 1000000)))"
  kill -KILL "$k" 2>/dev/null || true
  wait "$k" 2>/dev/null || true
  alive_and_sound
  if [ $((i % 25)) = 0 ] || [ "$i" = "$N" ]; then
    settle
  fi
  if [ $((i % 100)) = 0 ]; then
    echo "$i kills, $(($(date +%s) - t0)) s: deaths $deaths, corrupt $corrupt, most children left $worst_children, left traced $left_traced, left stopped $left_stopped"
  fi
done
# The target goes on verifying its data: three more rounds.
rounds=$(grep -c '^ok' "$tmp/out")
for _ in $(seq 200); do
  [ "$(grep -c '^ok' "$tmp/out")" -ge $((rounds + 3)) ] && break
  sleep 0.1
done
[ "$(grep -c '^ok' "$tmp/out")" -ge $((rounds + 3)) ] || { echo "the target stopped verifying"; deaths=$((deaths + 1)); }
alive_and_sound
settle
echo "== $N kills (check and reclaim alternately, seed $seed) on a $GIB GiB target in $(($(date +%s) - t0)) s"
echo "target deaths: $deaths; corruption: $corrupt; children (copies, zombies) left after settling: $worst_children; left traced: $left_traced; left stopped: $left_stopped"
echo "target rounds verified: $(grep -c '^ok' "$tmp/out")"
