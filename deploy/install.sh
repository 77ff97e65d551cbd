#!/bin/sh
# Install mergend, mergen-forwarder and their systemd units.
#
#   deploy/install.sh                  # binaries from target/release, into /usr/local
#   BIN_DIR=path PREFIX=/opt/mergen DESTDIR=/tmp/root deploy/install.sh
#
# BIN_DIR: where the built binaries are (default: target/release next to this script).
# PREFIX:  installation prefix for the binaries (default /usr/local); the units are
#          rewritten to point at $PREFIX/bin.
# DESTDIR: staging root (packaging, tests); systemd is only reloaded when it is empty.
# MGR_CONFIG_ROOT: where VM config dirs live (default: the value in an existing
#          /etc/mergen/mergen.env, else /etc/mergen/vm.d); mergen@.service reads each
#          VM's env file from there.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
BIN_DIR=${BIN_DIR:-$here/../target/release}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
ENV_FILE="$DESTDIR/etc/mergen/mergen.env"

for bin in mergend mergen-forwarder; do
    if [ ! -x "$BIN_DIR/$bin" ]; then
        echo "install.sh: $BIN_DIR/$bin not found; build with: cargo build --release" >&2
        exit 1
    fi
done

# The config root the units must agree with: the caller's, else the one the operator
# already set in mergen.env (a value may be quoted), else the default.
CONFIG_ROOT=${MGR_CONFIG_ROOT:-}
if [ -z "$CONFIG_ROOT" ] && [ -f "$ENV_FILE" ]; then
    CONFIG_ROOT=$(sed -n "s/^[[:space:]]*MGR_CONFIG_ROOT=[\"']\{0,1\}\([^\"']*\)[\"']\{0,1\}[[:space:]]*$/\1/p" "$ENV_FILE" | tail -n 1)
fi
CONFIG_ROOT=${CONFIG_ROOT:-/etc/mergen/vm.d}
case $CONFIG_ROOT in
    /*) ;;
    *) echo "install.sh: MGR_CONFIG_ROOT must be an absolute path, not $CONFIG_ROOT" >&2; exit 1;;
esac
CONFIG_ROOT=${CONFIG_ROOT%/}

install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$UNIT_DIR" "$DESTDIR/etc/mergen" "$DESTDIR$CONFIG_ROOT"
install -m 0755 "$BIN_DIR/mergend" "$BIN_DIR/mergen-forwarder" "$DESTDIR$PREFIX/bin/"
for unit in mergen@.service mergen-forwarder.service mergend.service; do
    sed -e "s|/usr/local/bin/|$PREFIX/bin/|g" \
        -e "s|^EnvironmentFile=/etc/mergen/vm.d/%i/env$|EnvironmentFile=$CONFIG_ROOT/%i/env|" \
        "$here/systemd/$unit" > "$DESTDIR$UNIT_DIR/$unit"
    chmod 0644 "$DESTDIR$UNIT_DIR/$unit"
done
# The settings files are the operator's: created once, never overwritten.
if [ ! -e "$ENV_FILE" ]; then
    {
        printf '# MGR_* settings for mergend and the mergen@ units (no secrets: the VM units read it)\n'
        printf 'MGR_SUPERVISOR=systemd\n'
        if [ "$CONFIG_ROOT" != /etc/mergen/vm.d ]; then
            printf 'MGR_CONFIG_ROOT=%s\n' "$CONFIG_ROOT"
        fi
    } > "$ENV_FILE"
fi
# Secrets such as MGR_API_TOKEN: read by mergend.service only, readable by root only.
if [ ! -e "$DESTDIR/etc/mergen/mergend.env" ]; then
    (umask 077; printf '# Secrets for mergend only (MGR_API_TOKEN=...): never passed to VMs\n' \
        > "$DESTDIR/etc/mergen/mergend.env")
fi
if [ ! -e "$DESTDIR/etc/mergen/forwarder.env" ]; then
    printf '# FWD_* settings for mergen-forwarder\nFWD_LOG_LEVEL=info\n' \
        > "$DESTDIR/etc/mergen/forwarder.env"
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "installed; start the control plane with: systemctl enable --now mergend mergen-forwarder"
else
    echo "installed into ${DESTDIR:-/} (systemd not running here: no daemon-reload)"
fi
