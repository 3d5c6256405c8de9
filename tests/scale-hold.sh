#!/usr/bin/env bash
# The hold scenario of RFD 0008 on this machine: a dev broker, N fixture
# agents provisioned, then held connected over 16 UDP sockets while they ask
# for 200 grants/s for 2 s. Prints the broker's idle RSS and a summary of
# grantline-loadgen's JSON. Usage: tests/scale-hold.sh N  (after
# cargo build --release --bins)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: tests/scale-hold.sh N}
B=$PWD/target/release
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
"$B/grantlined" dev --state-dir "$D/state" --listen 127.0.0.1:0 >"$D/out" 2>/dev/null &
until grep -q "ready on" "$D/out" 2>/dev/null; do sleep 0.1; done
kill -TERM $!; wait $! || true
"$B/grantline-loadgen" provision --state-dir "$D/state" --nodes "$N" --out "$D/fixture"
"$B/grantlined" dev --state-dir "$D/state" --listen 127.0.0.1:0 >"$D/out2" 2>/dev/null &
BP=$!
until grep -q "ready on" "$D/out2" 2>/dev/null; do sleep 0.1; done
ADDR=$(sed -n 's/^grantlined ready on //p' "$D/out2")
echo "idle broker $(grep VmRSS /proc/$BP/status)"
"$B/grantline-loadgen" hold --broker "$ADDR" --ca-file "$D/state/ca.pem" --fixture "$D/fixture" \
  --agents "$N" --endpoints 16 --role dev --san load.example.com --grant-rate 200 --seconds 2 --broker-pid "$BP"
kill -TERM "$BP"; wait "$BP" || true
