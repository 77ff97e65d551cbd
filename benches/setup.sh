#!/usr/bin/env bash
# What `mergen-bench` needs besides the test suite's packages (scripts/test.sh), on a
# Debian 12 machine, as root: the baselines of `mergen-bench forwarder` (nginx's stream
# module, HAProxy, hitch), the servers and tools it drives, then a release build.
# Not part of CI: the benchmarks are run by hand (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# libnginx-mod-stream loads into Debian's nginx (the package nginx-light depends on);
# no nginx-core or nginx-full is needed. hitch 1.7 comes without its shared session
# cache (see docs/benchmarks.md).
PKGS=(iproute2 openssl procps nginx-light libnginx-mod-stream haproxy hitch)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian starts services on install; the benchmark starts its own instances.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi
cargo build --release -p mergen-bench -p mergen-ctl -p mergen-dataplane
