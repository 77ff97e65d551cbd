#!/usr/bin/env bash
# What `mergen-bench` needs besides the test suite's packages (scripts/test.sh), on a
# Debian 12 machine, as root: the baselines of `mergen-bench forwarder` (nginx's stream
# module, HAProxy, hitch), the servers and tools it drives, then a release build.
# Not part of CI: the benchmarks are run by hand (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."

# libnginx-mod-stream loads into Debian's nginx (the package nginx-light depends on);
# no nginx-core or nginx-full is needed. Debian's hitch 1.7 comes without its shared
# session cache (see docs/benchmarks.md). etcd holds the passthrough column's routes.
PKGS=(iproute2 openssl procps nginx-light libnginx-mod-stream haproxy hitch etcd-server etcd-client)
echo "==> apt-get install ${PKGS[*]}"
# Debian starts services on install; the benchmark starts its own instances.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
DEBIAN_FRONTEND=noninteractive apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
cargo build --release -p mergen-bench -p mergen-ctl -p mergen-dataplane
