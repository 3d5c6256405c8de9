#!/usr/bin/env bash
# Builds the packages into target/packages/ (RFD 0007):
#   grantline_VERSION_ARCH.deb, grantline-agent_VERSION_ARCH.deb   (cargo-deb)
#   grantline-VERSION.ARCH.rpm, grantline-agent-VERSION.ARCH.rpm   (cargo-generate-rpm, no rpmbuild)
# The tools come from crates.io (cargo install --locked), once.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

have() { cargo "$1" --version 2>/dev/null | grep -qF "$2"; }
have deb "$CARGO_DEB_VERSION" || cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
have generate-rpm "$CARGO_GENERATE_RPM_VERSION" \
  || cargo install --locked --quiet cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION"

cargo build --release --locked -p grantline-daemon -p grantline-cli -p grantline-agent --bins

out=target/packages
stage=$out/stage
rm -rf "$out"
mkdir -p "$stage"
for b in grantlined grantline grantline-agent; do
  install -m 0755 "target/release/$b" "$stage/$b"
  strip --strip-unneeded "$stage/$b"
done
# Man pages from the programs' own argument definitions (clap_mangen).
target/release/grantlined man | gzip -9n >"$stage/grantlined.8.gz"
target/release/grantline man | gzip -9n >"$stage/grantline.1.gz"
target/release/grantline-agent man | gzip -9n >"$stage/grantline-agent.8.gz"

# (cargo-deb warns that staged paths are not under target/release: they are
# prebuilt on purpose, so that warning is dropped.)
for p in grantline-daemon grantline-agent; do
  cargo deb --locked -p "$p" --no-build --no-strip -o "$out/" 2> >(grep -v "detected as Cargo target dir" >&2) >/dev/null
done
cargo generate-rpm -p daemon -o "$out/" >/dev/null
cargo generate-rpm -p agent -o "$out/" >/dev/null
ls -1 "$out"/*.deb "$out"/*.rpm
