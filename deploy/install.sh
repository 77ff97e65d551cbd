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
set -eu

here=$(cd "$(dirname "$0")" && pwd)
BIN_DIR=${BIN_DIR:-$here/../target/release}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}

for bin in mergend mergen-forwarder; do
    if [ ! -x "$BIN_DIR/$bin" ]; then
        echo "install.sh: $BIN_DIR/$bin not found; build with: cargo build --release" >&2
        exit 1
    fi
done

install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$UNIT_DIR" "$DESTDIR/etc/mergen/vm.d"
install -m 0755 "$BIN_DIR/mergend" "$BIN_DIR/mergen-forwarder" "$DESTDIR$PREFIX/bin/"
for unit in mergen@.service mergen-forwarder.service mergend.service; do
    sed "s|/usr/local/bin/|$PREFIX/bin/|g" "$here/systemd/$unit" > "$DESTDIR$UNIT_DIR/$unit"
    chmod 0644 "$DESTDIR$UNIT_DIR/$unit"
done
# The shared settings file is the operator's: created empty once, never overwritten.
if [ ! -e "$DESTDIR/etc/mergen/mergen.env" ]; then
    printf '# MGR_* settings for mergend and the mergen@ units\nMGR_SUPERVISOR=systemd\n' \
        > "$DESTDIR/etc/mergen/mergen.env"
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "installed; start the control plane with: systemctl enable --now mergend mergen-forwarder"
else
    echo "installed into ${DESTDIR:-/} (systemd not running here: no daemon-reload)"
fi
