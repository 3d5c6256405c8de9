#!/usr/bin/env bash
# The scale scenarios of RFD 0008, one command each, on this machine:
#   tests/scale.sh hold N     hold N agents over 64 UDP sockets (ENDPOINTS=), 200 grants/s for 2 s
#   tests/scale.sh sweep N    raise the grant rate over N agents to the peak; p99 at half of it
#   tests/scale.sh storm N    restart the broker under N connected agents; time to all re-granted
#                             (RATE= sets the broker's --reconnects-per-second)
#   tests/scale.sh vault      OpenBao pki/sign and the broker's modes in the same run (ratio)
# Each prints grantline-loadgen's JSON (one object), with the broker's own CPU
# time per handshake, grant or re-granted agent from /proc. PIN=1 runs the
# broker (and OpenBao) on CPU 0 and the load generator on CPU 1 (taskset), so
# rates are per broker core. Build first:
#   cargo build --release --bins
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?usage: tests/scale.sh hold|sweep|storm N | vault}
B=$PWD/target/release
if [ "$scenario" = vault ]; then
  exec "$B/grantline-bench-vault" "${2:-3000}"
fi
# The load generator's CPU, and the broker's, when pinned.
LOADGEN=("$B/grantline-loadgen")
BROKER_CPU=()
if [ "${PIN:-}" = 1 ]; then
  LOADGEN=(taskset -c 1 "$B/grantline-loadgen")
  BROKER_CPU=(taskset -c 0)
fi
N=${2:?usage: tests/scale.sh $scenario N}
D=$(mktemp -d)
BP=
cleanup() { [ -n "$BP" ] && kill -TERM "$BP" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT

start_broker() { # $1: listen address; sets BP and ADDR
  : >"$D/out"
  "${BROKER_CPU[@]}" "$B/grantlined" dev --state-dir "$D/state" --listen "$1" --metrics 127.0.0.1:0 ${RATE:+--reconnects-per-second "$RATE"} \
    >"$D/out" 2>"$D/err" &
  BP=$!
  echo "$BP" >"$D/pid"
  until grep -q "ready on" "$D/out" 2>/dev/null; do
    kill -0 "$BP" 2>/dev/null || { cat "$D/err" >&2; exit 69; }
    sleep 0.1
  done
  ADDR=$(sed -n 's/^grantlined ready on //p' "$D/out")
  until grep -q "metrics on" "$D/out" 2>/dev/null; do sleep 0.1; done
  METRICS=$(sed -n 's|^grantlined metrics on http://\([^/]*\)/metrics|\1|p' "$D/out")
}
# The broker's handshake and resumption counters, to stderr.
handshake_counters() {
  exec 3<>"/dev/tcp/${METRICS%:*}/${METRICS#*:}"
  printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
  grep -E '^grantline_(handshakes_total|tls_resumptions_total)' <&3 >&2 || true
  exec 3<&-
}
stop_broker() { kill -TERM "$BP"; wait "$BP" || true; BP=; }

start_broker 127.0.0.1:0
stop_broker
"$B/grantline-loadgen" provision --state-dir "$D/state" --nodes "$N" --out "$D/fixture" >&2
start_broker "$ADDR"
echo "idle broker $(grep VmRSS /proc/$BP/status)" >&2
fleet=(--broker "$ADDR" --ca-file "$D/state/ca.pem" --fixture "$D/fixture" --agents "$N" --endpoints "${ENDPOINTS:-64}"
  --role dev --san load.example.com)
case "$scenario" in
  hold) "${LOADGEN[@]}" hold "${fleet[@]}" --grant-rate 200 --seconds 2 --broker-pid "$BP" ;;
  sweep) "${LOADGEN[@]}" sweep "${fleet[@]}" --start-rate 500 --step-seconds 5 --broker-pid "$BP" ;;
  storm)
    "${LOADGEN[@]}" storm "${fleet[@]}" --ready-file "$D/ready" --limit-seconds 300 \
      --broker-pid-file "$D/pid" >"$D/storm.json" &
    LP=$!
    until [ -e "$D/ready" ]; do kill -0 "$LP" 2>/dev/null || exit 70; sleep 0.2; done
    stop_broker
    start_broker "$ADDR"
    wait "$LP"
    cat "$D/storm.json"
    handshake_counters
    stop_broker
    "$B/grantline" audit verify --db "$D/state/audit.db" --key-file "$D/state/audit.vkey" >&2
    ;;
  *) echo "unknown scenario $scenario" >&2; exit 64 ;;
esac
