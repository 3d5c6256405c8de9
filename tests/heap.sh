#!/usr/bin/env bash
# Where a connected agent's memory goes on the broker (RFD 0008, "A
# connection's memory, cut"): heaptrack on a dev broker holding N fixture
# agents, the broker killed with SIGKILL while they are connected (so all
# that is still allocated counts as leaked), then the leaked bytes by
# allocation site divided by N. Needs Debian's heaptrack; build first:
#   cargo build --release --bins
#   tests/heap.sh [N]      (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v heaptrack >/dev/null || { echo "heaptrack not found: apt-get install heaptrack" >&2; exit 69; }
B=$PWD/target/release
N=${1:-2000}
D=$(mktemp -d)
LP= HP=
cleanup() { [ -n "$LP" ] && kill "$LP" 2>/dev/null; [ -n "$HP" ] && kill "$HP" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT

wait_ready() { until grep -q "ready on" "$D/out" 2>/dev/null; do sleep 0.2; done; }
"$B/grantlined" dev --state-dir "$D/state" --listen 127.0.0.1:0 >"$D/out" 2>"$D/err" &
BP=$!
wait_ready
ADDR=$(sed -n 's/^grantlined ready on //p' "$D/out")
kill -TERM "$BP"; wait "$BP" || true
"$B/grantline-loadgen" provision --state-dir "$D/state" --nodes "$N" --out "$D/fixture" >/dev/null
: >"$D/out"
heaptrack -o "$D/heap" "$B/grantlined" dev --state-dir "$D/state" --listen "$ADDR" --metrics 127.0.0.1:0 \
  >"$D/out" 2>"$D/err" &
HP=$!
wait_ready
BP=$(pgrep -f "grantlined dev --state-dir $D/state" | grep -vx "$HP" | tail -1)
"$B/grantline-loadgen" hold --broker "$ADDR" --ca-file "$D/state/ca.pem" --fixture "$D/fixture" --agents "$N" \
  --endpoints 16 --role dev --san load.example.com --grant-rate 50 --seconds 600 >/dev/null &
LP=$!
until grep -q "metrics on" "$D/out" 2>/dev/null; do sleep 0.2; done
METRICS=$(sed -n 's|^grantlined metrics on http://\([^/]*\)/metrics|\1|p' "$D/out")
connected() { # the broker's own count of connections with an agent
  exec 3<>"/dev/tcp/${METRICS%:*}/${METRICS#*:}"
  printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
  sed -n 's/^grantline_connections \([0-9]*\).*/\1/p' <&3
  exec 3<&-
}
until [ "$(connected)" = "$N" ]; do kill -0 "$LP" 2>/dev/null || { echo "load generator failed" >&2; exit 70; }; sleep 0.5; done
kill -KILL "$BP"
wait "$HP" || true
kill "$LP" 2>/dev/null || true
heaptrack_print -f "$D"/heap.* --print-peaks 0 --print-allocators 0 --print-temporary 0 --print-leaks 0 \
  -F "$D/stacks" --flamegraph-cost-type leaked >/dev/null 2>&1
python3 - "$D/stacks" "$N" <<'PY'
import collections, sys
path, n = sys.argv[1], int(sys.argv[2])
# What a site is, from the frames of its stack (first match wins).
kinds = [
    ("quinn: a connection's endpoint events", ["unbounded_channel<> (unbounded.rs)", "channel (conn_events.rs)"]),
    ("quinn: ConnectionInner (quinn-proto's Connection inline)", ["new (connection.rs);new (connection.rs)"]),
    ("aws-lc: packet and header protection keys", ["packet_key (quic.rs)", "header_protection_key", "aead_ctx.rs"]),
    ("tokio: task cells", ["spawn<> (mod.rs)"]),
    ("rustls and quinn-proto: handshake, session, endpoint index", ["rustls.rs", "quic.rs", "server_conn", "handshake.rs", "state.rs", "accept (endpoint.rs)"]),
    ("quinn-proto: after the handshake (sent packets, CIDs, queues, timers)", ["drive_transmit", "process_conn_events", "drive_timer", "handle_events", "spaces.rs"]),
    ("SQLite", ["sqlite3"]),
    ("grantlined", ["grantlined.rs", "registry.rs", "writer.rs", "broker.rs"]),
]
total = collections.Counter()
for line in open(path):
    stack, _, size = line.rstrip("\n").rpartition(" ")
    kind = next((k for k, keys in kinds if any(key in stack for key in keys)), "other")
    total[kind] += int(size)
print(f"{sum(total.values()) / n:8.0f} bytes per agent in all ({n} agents)")
for kind, size in total.most_common():
    print(f"{size / n:8.0f}  {kind}")
PY
