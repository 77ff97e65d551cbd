#!/usr/bin/env bash
# Builds the static mergen-init that the converter injects into images, and prints
# its path. musl when the rustup target is installed (`rustup target add
# x86_64-unknown-linux-musl`), otherwise glibc with crt-static (libc6-dev's libc.a):
# either way a static-pie binary with no interpreter and no shared libraries.
# mergen-init needs no NSS (it reads the image's /etc/passwd itself), so static glibc
# loses nothing.
#
# Its own target dir (default target/static-init) keeps the build away from a cargo
# that holds the workspace's lock, e.g. a running `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${MERGEN_STATIC_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/static-init}"
if rustc --print sysroot >/dev/null 2>&1 &&
    [ -d "$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-musl" ]; then
    triple=x86_64-unknown-linux-musl
else
    triple=x86_64-unknown-linux-gnu
    # With an explicit --target these flags reach only the target's crates, not build
    # scripts or proc-macros.
    export RUSTFLAGS="-C target-feature=+crt-static"
fi
cd "$root"
cargo build --quiet --release -p mergen-init --target "$triple" --target-dir "$target_dir" \
    --config profile.release.strip=true --config profile.release.debug=false >&2
echo "$target_dir/$triple/release/mergen-init"
