#!/usr/bin/env bash
# Run the whole product on an embedded default, from a fresh clone:
#   - mergend (control API) on 127.0.0.1:8080,
#   - mergen-forwarder on unprivileged loopback ports (HTTPS on 127.0.0.1:8443),
#   - a self-signed wildcard certificate for *.localhost made on first start,
#   - all state under one directory: $MERGEN_STATE_DIR, else $XDG_STATE_HOME/mergen,
#     else ~/.local/state/mergen (never /etc),
#   - the embedded supervisor when systemd is not PID 1, and the process runtime when
#     Firecracker is not installed.
# VMs get network namespaces, veth links and nftables rules: run it as root.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${MERGEN_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/mergen}"
mkdir -p "$STATE"/{vm.d,data,run,certs,hooks.d}

echo "==> building (release)"
cargo build --release -q -p mergen-ctl -p mergen-dataplane
BIN="$PWD/target/release"

CERT="$STATE/certs/wildcard.localhost.crt"
KEY="$STATE/certs/wildcard.localhost.key"
if [ ! -s "$CERT" ] || [ ! -s "$KEY" ]; then
    echo "==> generating a self-signed certificate for *.localhost in $STATE/certs"
    "$BIN/mergen-forwarder" gen-cert --out-dir "$STATE/certs" --suffix localhost
fi

export MGR_CONFIG_ROOT="${MGR_CONFIG_ROOT:-$STATE/vm.d}"
export MGR_DATA_ROOT="${MGR_DATA_ROOT:-$STATE/data}"
export MGR_RUN_ROOT="${MGR_RUN_ROOT:-$STATE/run}"
export MGR_GLOBAL_HOOKS_DIR="${MGR_GLOBAL_HOOKS_DIR:-$STATE/hooks.d}"
export MGR_HTTP_ADDR="${MGR_HTTP_ADDR:-127.0.0.1:8080}"
export MGR_SUPERVISOR="${MGR_SUPERVISOR:-auto}"
export MGR_RUNTIME="${MGR_RUNTIME:-auto}"
export MGR_IMAGE_ROOTS="${MGR_IMAGE_ROOTS:-$STATE/data}"
export FWD_CONFIG_ROOT="$MGR_CONFIG_ROOT"
export FWD_TLS_CERT_FILE="$CERT" FWD_TLS_KEY_FILE="$KEY"
export FWD_DOMAIN_SUFFIX="${FWD_DOMAIN_SUFFIX:-localhost}"
export FWD_LISTENERS="${FWD_LISTENERS:-127.0.0.1:8443=443,127.0.0.1:2022=22,127.0.0.1:15432=5432,127.0.0.1:16379=6379,127.0.0.1:19092=9092}"
export FWD_ADMIN_ADDR="${FWD_ADMIN_ADDR:-127.0.0.1:9901}"
export FWD_LOG_LEVEL="${FWD_LOG_LEVEL:-info}"

if [ "$(id -u)" -ne 0 ]; then
    echo "==> WARNING: not root: the API works, but starting VMs (namespaces, links, nftables) will fail"
fi

"$BIN/mergen-forwarder" &
FWD_PID=$!
trap 'kill "$FWD_PID" 2>/dev/null; wait "$FWD_PID" 2>/dev/null' EXIT
echo "==> state in $STATE"
echo "==> control API on http://$MGR_HTTP_ADDR, HTTPS edge on https://<vm>.localhost:8443 (forwarder pid $FWD_PID)"
"$BIN/mergend"
