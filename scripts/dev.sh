#!/usr/bin/env bash
# A development broker on embedded defaults with an enrolled local agent,
# ready to hand out credentials. State lives in .grantline-dev/ (override with
# GRANTLINE_DEV_DIR); Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${GRANTLINE_DEV_DIR:-$PWD/.grantline-dev}"
listen="${GRANTLINE_DEV_LISTEN:-127.0.0.1:7443}"
cargo build --release --locked --bins
bin="$PWD/target/release"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

fifo="$(mktemp -u)"; mkfifo "$fifo"
"$bin/grantlined" dev --state-dir "$dir" --listen "$listen" >"$fifo" &
pids+=($!)
exec 3<"$fifo"; rm -f "$fifo"
read -r line <&3 || { echo "dev.sh: grantlined did not start (see above)" >&2; exit 69; }
addr="${line##* }"   # "grantlined ready on ADDR"

agent_dir="$dir/agent"
if [ ! -f "$agent_dir/agent.json" ]; then
  "$bin/grantline-agent" enroll --broker "$addr" --token "$(cat "$dir/join-token")" \
    --ca-file "$dir/ca.pem" --state-dir "$agent_dir" --name "$(hostname)-dev"
fi
# The dev agent's own config: an identity that expired while the broker was
# stopped is recovered with the fresh join token each broker start writes.
[ -f "$dir/agent.toml" ] || printf 'join_token_file = "%s"\n' "$dir/join-token" >"$dir/agent.toml"
sock="$dir/agent.sock"
spiffe_sock="$dir/spiffe.sock"
"$bin/grantline-agent" run --state-dir "$agent_dir" --socket "$sock" --config "$dir/agent.toml" \
  --spiffe-socket "$spiffe_sock" &
pids+=($!)

cat <<MSG

Grantline dev broker on $addr, agent socket $sock. Try:
  $bin/grantline-agent get x509 --role dev --san localhost --out /tmp/gl-x509 --socket $sock
  $bin/grantline-agent get ssh --role dev --principal ${USER:-$(id -un)} --out /tmp/gl-ssh --socket $sock
  $bin/grantline audit verify --db $dir/audit.db --key-file $dir/audit.vkey
  $bin/grantline nodes list --state-dir $dir          (admin API: grants list, audit tail, ...)
SPIFFE (trust domain grantline.dev; OIDC issuer in $dir/oidc-issuer, its TLS anchor $dir/oidc-ca.pem):
  SPIFFE_ENDPOINT_SOCKET=unix://$spiffe_sock python3 -c 'from spiffe import WorkloadApiClient as C; print(C().fetch_x509_svid().spiffe_id)'
Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
