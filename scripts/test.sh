#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests against real
# processes on loopback. The release binaries are built once and shared by
# every end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
# The layout rules of RFD 0001: no import circle, no product file over 450 lines.
scripts/check-layout.py
cargo build --release --locked --workspace --bins
# The .deb and .rpm packages the packaging tests install and inspect.
packaging/build.sh
cargo test --release --locked --workspace "$@"
# quinn-proto's own suite once more with every test server releasing its
# rustls state after the handshake, as the broker's do
# (third_party/quinn-proto/PATCHES.md).
QUINN_PROTO_TEST_RELEASE_TLS=1 cargo test --release --locked -p quinn-proto --lib
