#!/usr/bin/env bash
# Build the siterelay Debian package from this checkout.
#
#   image-build/build-deb.sh                       # cargo build --release, package for this machine
#   image-build/build-deb.sh --binary PATH --arch ARCH   # package an already built binary
#
# Output: target/deb/siterelay_<version>_<arch>.deb. Needs only dpkg-deb (Debian/Ubuntu base).
# What the package does is described in image-build/README.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
binary=""
arch="$(dpkg --print-architecture)"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --arch) arch="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$binary" ]; then
    (cd "$root" && cargo build --release --locked --bin siterelay)
    binary="$root/target/release/siterelay"
fi
[ -x "$binary" ] || { echo "build-deb.sh: $binary is not an executable" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
pkg="$root/target/deb/siterelay_${version}_${arch}"
rm -rf "$pkg"
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/siterelay/tls" \
    "$pkg/usr/share/doc/siterelay/schema"

install -m 0755 "$binary" "$pkg/usr/bin/siterelay"
# Debug information is for developers, not for an SD card.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$pkg/usr/bin/siterelay"
fi
install -m 0644 "$root/systemd-units/siterelay.service" "$pkg/lib/systemd/system/siterelay.service"
install -m 0640 "$root/docs/siterelay.example.toml" "$pkg/etc/siterelay/siterelay.toml"
install -m 0644 "$root/README.md" "$root/docs/"*.md "$pkg/usr/share/doc/siterelay/"
install -m 0644 "$root/docs/siterelay.example.toml" "$pkg/usr/share/doc/siterelay/"
install -m 0644 "$root/hardware/README.md" "$pkg/usr/share/doc/siterelay/hardware.md"
install -m 0644 "$root/docs/schema/"*.json "$pkg/usr/share/doc/siterelay/schema/"

size_kib="$(du -sk "$pkg" | cut -f1)"
cat > "$pkg/DEBIAN/control" <<EOF
Package: siterelay
Version: ${version}
Architecture: ${arch}
Maintainer: siterelay developers <siterelay@invalid>
Installed-Size: ${size_kib}
Depends: adduser, libc6
Recommends: systemd
Section: net
Priority: optional
Homepage: https://github.com/siterelay/siterelay
Description: HL7 v2 and device edge relay for hospital information sharing
 Listens to HL7 v2 feeds over MLLP and to analysers and devices on serial
 lines, stores every message durably in SQLite before acknowledging it, and
 forwards normalised JSON records over mutual-TLS MQTT to a central
 integration layer, reporting its own health so a fleet can be watched.
EOF
echo "/etc/siterelay/siterelay.toml" > "$pkg/DEBIAN/conffiles"

cat > "$pkg/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = "configure" ]; then
    if ! getent passwd siterelay >/dev/null; then
        install -d -m 0700 /var/lib/siterelay
        adduser --system --group --home /var/lib/siterelay --no-create-home \
            --gecos "siterelay edge relay" siterelay >/dev/null
    fi
    # The outbox directory (systemd's StateDirectory= also creates it with these rights).
    install -d -m 0700 -o siterelay -g siterelay /var/lib/siterelay
    # Serial analysers and devices.
    if getent group dialout >/dev/null; then
        adduser siterelay dialout >/dev/null 2>&1 || true
    fi
    chown root:siterelay /etc/siterelay /etc/siterelay/tls /etc/siterelay/siterelay.toml
    chmod 0750 /etc/siterelay /etc/siterelay/tls
    chmod 0640 /etc/siterelay/siterelay.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        # Enabled, not started: the box needs its certificates and config first.
        systemctl enable siterelay.service >/dev/null || true
        if systemctl is-active --quiet siterelay.service; then
            systemctl restart siterelay.service || true
        fi
    fi
    echo "siterelay: edit /etc/siterelay/siterelay.toml, put the TLS files in /etc/siterelay/tls/,"
    echo "           run 'sudo -u siterelay siterelay check-config',"
    echo "           then 'systemctl start siterelay'."
fi
exit 0
EOF
cat > "$pkg/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = "remove" ]; then
    systemctl stop siterelay.service >/dev/null 2>&1 || true
fi
exit 0
EOF
cat > "$pkg/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = "purge" ]; then
    # The outbox holds patient data and undelivered messages: never deleted automatically.
    if [ -d /var/lib/siterelay ]; then
        echo "siterelay: /var/lib/siterelay (the outbox) was kept: it may hold undelivered" \
             "messages and patient data. The siterelay command is gone with the package, so" \
             "check what it holds by reinstalling siterelay and running 'siterelay queue stats'" \
             "(or see the 'queue stats' you ran before removing it); delete the directory only" \
             "when nothing is pending." >&2
    fi
    if [ -d /run/systemd/system ]; then
        systemctl disable siterelay.service >/dev/null 2>&1 || true
    fi
fi
exit 0
EOF
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"

dpkg-deb --root-owner-group --build "$pkg" "$pkg.deb" >/dev/null
echo "$pkg.deb"
