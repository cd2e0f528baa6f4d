#!/usr/bin/env bash
# Builds kal and runs it on the built-in leaking example (examples/leaky.c).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
out=$(mktemp -d)
gcc -g -O1 -o "$out/leaky" examples/leaky.c
echo "\$ kal run --json $out/report.json -- $out/leaky" >&2
status=0
target/release/kal run --json "$out/report.json" -- "$out/leaky" || status=$?
echo "kal exited with $status (23: something was definitely lost); JSON report: $out/report.json" >&2
