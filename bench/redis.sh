#!/usr/bin/env bash
# redis-server (Debian, linked to jemalloc) under kal. Usage: bash bench/redis.sh [RUNS] [REQUESTS] [SECONDS]
#
# 1. Throughput: `redis-benchmark -t set,get -n REQUESTS -P 16 -r 1000000 -d 16` (client on
#    core 1 with `taskset -c 1`), against redis-server on core 0 (`taskset -c 0`; under kal,
#    kal run is pinned to core 0 with it, so its checks compete with the server): plain,
#    under `kal run`, and under `kal run --check-every 1s`, alternated, RUNS runs each
#    (default 5); medians, as a markdown table.
# 2. Leak tolerance on a healthy server: `kal run --reclaim --check-every 1s` while the
#    verifying client (crates/kal/tests/programs/redis_client.c) loads 200,000 keys and runs
#    SECONDS (default 60) of SET/GET/DEL, checking every reply against its model. Prints the
#    operations, mismatches, checks, blocks reclaimed (must be 0) and how redis ended.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
REQUESTS=${2:-1000000}
SECONDS_MIXED=${3:-60}
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || {
  echo "installing redis-server, redis-tools" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >/dev/null
}
cargo build --release --workspace --quiet
KAL=$PWD/target/release/kal
tmp=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
gcc -O2 -g -o "$tmp/redis_client" crates/kal/tests/programs/redis_client.c

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
port=16400
REDIS_ARGS=(--bind 127.0.0.1 --save '' --appendonly no --daemonize no --protected-mode no --dir "$tmp" --logfile "$tmp/redis.log")

# start WRAPPER...: starts redis-server on a fresh port under WRAPPER, waits for PING.
start() {
  port=$((port + 1))
  "$@" redis-server --port "$port" "${REDIS_ARGS[@]}" > /dev/null 2>> "$tmp/kal.err" &
  server=$!
  for _ in $(seq 300); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  echo "redis-server did not start: $*" >&2
  exit 1
}
stop() {
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  wait "$server" 2>/dev/null || true
  server=
}

declare -A rps
modes=(plain kal check)
for i in $(seq "$RUNS"); do
  for mode in "${modes[@]}"; do
    case $mode in
      plain) start taskset -c 0 ;;
      kal) start taskset -c 0 "$KAL" run -q --error-exitcode 0 -- ;;
      check) start taskset -c 0 "$KAL" run -q --error-exitcode 0 --check-every 1s --json "$tmp/checks-$i.jsonl" -- ;;
    esac
    out=$(taskset -c 1 redis-benchmark -p "$port" -t set,get -n "$REQUESTS" -P 16 -r 1000000 -d 16 -q 2>/dev/null | tr '\r' '\n')
    set_rps=$(sed -n 's/^SET: \([0-9.]*\) requests per second.*/\1/p' <<< "$out" | tail -1)
    get_rps=$(sed -n 's/^GET: \([0-9.]*\) requests per second.*/\1/p' <<< "$out" | tail -1)
    rps[$mode,set]+="$set_rps "
    rps[$mode,get]+="$get_rps "
    stop
    echo "run $i $mode: SET $set_rps GET $get_rps" >&2
  done
done

pauses=$(cat "$tmp"/checks-*.jsonl 2>/dev/null | python3 -c '
import json, sys
p = sorted(json.loads(l)["pause_ms"] for l in sys.stdin if "\"check\"" in l)
print(f"{len(p)} checks, pause median {p[len(p)//2]:.2f} ms, worst {p[-1]:.2f} ms" if p else "no checks")')

echo
echo "redis-benchmark -t set,get -n $REQUESTS -P 16 -r 1000000 -d 16 (client taskset -c 1, server taskset -c 0), median of $RUNS, alternated"
echo
echo "| run | SET req/s | GET req/s | SET vs plain | GET vs plain | SET runs | GET runs |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
ps=$(tr ' ' '\n' <<< "${rps[plain,set]}" | grep . | median)
pg=$(tr ' ' '\n' <<< "${rps[plain,get]}" | grep . | median)
for mode in "${modes[@]}"; do
  s=$(tr ' ' '\n' <<< "${rps[$mode,set]}" | grep . | median)
  g=$(tr ' ' '\n' <<< "${rps[$mode,get]}" | grep . | median)
  case $mode in
    plain) name=plain ;;
    kal) name='`kal run`' ;;
    check) name='`kal run --check-every 1s`' ;;
  esac
  printf '| %s | %.0f | %.0f | %+.1f %% | %+.1f %% | %s| %s|\n' "$name" "$s" "$g" \
    "$(awk -v a="$s" -v b="$ps" 'BEGIN{print (a/b-1)*100}')" \
    "$(awk -v a="$g" -v b="$pg" 'BEGIN{print (a/b-1)*100}')" "${rps[$mode,set]}" "${rps[$mode,get]}"
done
echo
echo "checks during the --check-every runs: $pauses"

echo
echo "== kal run --reclaim --check-every 1s: 200,000 keys, then ${SECONDS_MIXED} s of verified SET/GET/DEL"
: > "$tmp/kal.err"
start "$KAL" run -q --error-exitcode 0 --reclaim --check-every 1s --json "$tmp/reclaim.jsonl" --
client_status=0
"$tmp/redis_client" "$port" 200000 "$SECONDS_MIXED" 11 > "$tmp/client.out" 2> "$tmp/client.err" || client_status=$?
alive=no
[ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && alive=yes
stop_status=0
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
wait "$server" || stop_status=$?
server=
cat "$tmp/client.out"
head -5 "$tmp/client.err"
echo "client exit status: $client_status; redis alive after the traffic: $alive; kal run exit status: $stop_status"
python3 - "$tmp/reclaim.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
checks = [l for l in lines if "check" in l]
last = lines[-1] if lines else {}
print(f"checks: {len(checks)}; exit report: {bool(last.get('at_exit'))}; "
      f"reclaimed: {last.get('reclaimed', {}).get('blocks')} blocks, "
      f"{last.get('reclaimed', {}).get('bytes')} bytes; "
      f"definitely lost at the last report: {last.get('summary', {}).get('direct')}; "
      f"untracked allocations: {last.get('untracked_allocations')}")
EOF
