#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what the tests need,
# then runs fmt, clippy and every test (the netns ones need root; they SKIP otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
# Servers the tests start (nginx, sshd, haproxy) and ip/nft live in sbin.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Debian packages the tests drive for real: namespaces/links/nftables, and the servers
# and clients that the forwarder and runtime tests put in namespaces; etcd for the
# cluster tests; protoc and its well-known types build the etcd client (etcd-client).
PKGS=(iproute2 nftables curl openssl procps nginx-light redis-server redis-tools
      openssh-server openssh-client postgresql postgresql-client haproxy wrk
      etcd-server etcd-client protobuf-compiler libprotobuf-dev
      docker-registry skopeo busybox-static apache2-utils e2fsprogs util-linux
      kcat nghttp2-client)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "==> installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # Debian starts services on install; the tests start their own instances.
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    else
        echo "==> WARNING: not root, cannot install: ${missing[*]} (tests needing them will SKIP)"
    fi
fi

echo "==> cargo fmt"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --workspace --no-fail-fast
