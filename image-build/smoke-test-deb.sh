#!/usr/bin/env bash
# Check a built siterelay .deb.
#
#   image-build/smoke-test-deb.sh --inspect PACKAGE.deb   # contents, control data, maintainer
#       scripts and the binary's architecture, without installing (any architecture: CI runs it
#       on the arm64 package; the full test below runs it too)
#   image-build/smoke-test-deb.sh PACKAGE.deb             # inspect, then on this (throwaway)
#       machine, as root: install, check what a trust's IT team would see, enrol, upgrade (the
#       same version again, then a higher one) with the unit enabled and then disabled, purge
#
# The unit's enablement is checked the way Debian's helpers record it, without a running
# systemd: the symlink in /etc/systemd/system/multi-user.target.wants/ and deb-systemd-helper's
# state in /var/lib/systemd/deb-systemd-helper-enabled/.
set -euo pipefail
fail() { echo "smoke-test-deb: FAIL: $*" >&2; exit 1; }

inspect=false
if [ "${1:-}" = "--inspect" ]; then
    inspect=true
    shift
fi
[ $# -eq 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
deb="$1"
[ -f "$deb" ] || fail "no such file: $deb"

WANTS=/etc/systemd/system/multi-user.target.wants/siterelay.service
DSH=/var/lib/systemd/deb-systemd-helper-enabled

# Everything that can be checked without installing.
inspect_deb() {
    local deb="$1" arch listing ctrl scripts
    arch="$(dpkg-deb -f "$deb" Architecture)"
    case "$(basename "$deb")" in
        *_"$arch".deb) ;;
        *) fail "Architecture $arch does not match the file name $deb" ;;
    esac
    [ "$(dpkg-deb -f "$deb" Package)" = siterelay ] || fail "package name"
    dpkg-deb -f "$deb" Maintainer | grep -q '@' || fail "no maintainer address"
    if dpkg-deb -f "$deb" Maintainer | grep -q 'invalid'; then fail "placeholder maintainer"; fi
    dpkg-deb -f "$deb" Depends | grep -q adduser || fail "Depends lacks adduser"

    listing="$(dpkg-deb -c "$deb" | awk '{print $6}')"
    for path in ./usr/bin/siterelay \
        ./usr/lib/systemd/system/siterelay.service \
        ./usr/lib/systemd/system/siterelay-metrics.service \
        ./usr/lib/systemd/system/siterelay-metrics.timer \
        ./etc/siterelay/siterelay.toml \
        ./usr/share/man/man8/siterelay.8.gz \
        ./usr/share/man/man8/siterelay-enrol.8.gz \
        ./usr/share/man/man8/siterelay-send.8.gz \
        ./usr/share/man/man5/siterelay.toml.5.gz \
        ./usr/share/bash-completion/completions/siterelay \
        ./usr/share/zsh/vendor-completions/_siterelay \
        ./usr/share/fish/vendor_completions.d/siterelay.fish \
        ./usr/share/doc/siterelay/copyright \
        ./usr/share/doc/siterelay/changelog.Debian.gz \
        ./usr/share/doc/siterelay/operations.md \
        ./usr/share/doc/siterelay/broker/mosquitto.conf \
        ./usr/share/doc/siterelay/schema/record.v1.schema.json; do
        grep -qx "$path" <<< "$listing" || fail "$deb lacks $path"
    done
    if grep -q '^\./lib/' <<< "$listing"; then
        fail "files under /lib (the unit belongs in /usr/lib/systemd/system): $(grep '^\./lib/' <<< "$listing")"
    fi

    ctrl="$(mktemp -d)"
    scripts="$ctrl/DEBIAN"
    dpkg-deb -e "$deb" "$scripts"
    grep -qx /etc/siterelay/siterelay.toml "$scripts/conffiles" || fail "the config is not a conffile"
    # Enable on first install only (deb-systemd-helper's was-enabled), restart on upgrade only if
    # running (try-restart with $2 set), never started by the install, no hand-written enable.
    grep -q 'deb-systemd-helper --quiet was-enabled siterelay.service' "$scripts/postinst" \
        || fail "postinst does not enable through deb-systemd-helper's was-enabled"
    grep -q 'try-restart' "$scripts/postinst" || fail "postinst does not try-restart on upgrade"
    if grep -vE '^[[:space:]]*(#|echo )' "$scripts/postinst" \
        | grep -qE 'systemctl (enable|start)|deb-systemd-invoke start'; then
        fail "postinst enables or starts by hand"
    fi
    # The metrics timer: enabled again only if it was enabled before (dh's "dont-enable").
    grep -q 'deb-systemd-helper debian-installed siterelay-metrics.timer' "$scripts/postinst" \
        || fail "postinst handles the metrics timer as a unit to enable"
    grep -q 'deb-systemd-helper purge' "$scripts/postrm" || fail "postrm does not purge the unit state"
    # The binary is gone when postrm runs: it must not tell anyone to run it.
    if grep -qE "siterelay (queue|status|check-config|run)" "$scripts/postrm"; then
        fail "postrm tells the user to run siterelay, which it has just removed"
    fi

    # The binary is for the package's architecture (ELF e_machine: 0x3e x86-64, 0xb7 AArch64).
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/siterelay > "$ctrl/siterelay"
    local machine
    machine="$(od -An -tx1 -j18 -N2 "$ctrl/siterelay" | tr -d ' \n')"
    case "$arch:$machine" in
        amd64:3e00 | arm64:b700) ;;
        *) fail "usr/bin/siterelay has ELF machine $machine, not $arch's" ;;
    esac
    # Man pages are roff, completions are scripts, copyright is DEP-5 with the bundled crates.
    # (Whole files read before grep: grep -q in a pipe could end it early under pipefail.)
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/man/man8/siterelay.8.gz | gzip -dc > "$ctrl/man"
    grep -q '^\.TH siterelay 8' "$ctrl/man" || fail "siterelay.8.gz is not a man page"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/doc/siterelay/copyright > "$ctrl/copyright"
    head -1 "$ctrl/copyright" | grep -qx 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/' \
        || fail "copyright is not DEP-5"
    grep -q 'vendor/serialport-' "$ctrl/copyright" || fail "copyright does not list the bundled crates"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/doc/siterelay/changelog.Debian.gz \
        | gzip -dc > "$ctrl/changelog"
    head -1 "$ctrl/changelog" | grep -q '^siterelay (' || fail "changelog.Debian.gz is not a Debian changelog"
    rm -rf "$ctrl"
    echo "smoke-test-deb: inspected ($deb: $arch)"
}

inspect_deb "$deb"
$inspect && exit 0

[ "$(id -u)" = 0 ] || fail "installing needs root (use --inspect to check the package only)"
if dpkg -s siterelay >/dev/null 2>&1; then
    fail "siterelay is already installed here; refusing to touch a real installation"
fi
[ "$(dpkg-deb -f "$deb" Architecture)" = "$(dpkg --print-architecture)" ] \
    || fail "$deb is not for this machine's architecture (use --inspect)"
rm -rf "${DSH:?}/siterelay.service.dsh-also" "$WANTS"

out="$(dpkg -i "$deb" 2>&1)" || fail "dpkg -i failed: $out"
echo "$out" | grep -q "siterelay enrol" || fail "the first install does not say what to do next: $out"

getent passwd siterelay >/dev/null || fail "no siterelay system user"
[ "$(stat -c '%U:%G %a' /etc/siterelay/siterelay.toml)" = "root:siterelay 640" ] \
    || fail "config ownership/mode: $(stat -c '%U:%G %a' /etc/siterelay/siterelay.toml)"
[ "$(stat -c '%U:%G %a' /etc/siterelay/tls)" = "root:siterelay 750" ] || fail "tls directory owner/mode"
[ "$(stat -c '%U:%G %a' /var/lib/siterelay)" = "siterelay:siterelay 700" ] || fail "data directory owner/mode"
[ -f /usr/lib/systemd/system/siterelay.service ] || fail "no unit in /usr/lib/systemd/system"
[ ! -e /lib/systemd/system/siterelay.service ] || [ -L /lib ] || fail "a unit in /lib/systemd/system"
/usr/bin/siterelay --version >/dev/null || fail "binary does not run"

# Enabled on the first install (Debian's helper: a symlink, and its state file), not the timer.
[ -L "$WANTS" ] || fail "siterelay.service not enabled on first install ($WANTS missing)"
[ -f "$DSH/siterelay.service.dsh-also" ] || fail "deb-systemd-helper has no state for siterelay.service"
[ ! -e /etc/systemd/system/timers.target.wants/siterelay-metrics.timer ] || fail "the metrics timer was enabled"

# Man pages where man finds them, completions where the shells look.
if command -v man >/dev/null 2>&1; then
    [ "$(man -w siterelay)" = /usr/share/man/man8/siterelay.8.gz ] || fail "man -w siterelay: $(man -w siterelay 2>&1)"
    [ "$(man -w 5 siterelay.toml)" = /usr/share/man/man5/siterelay.toml.5.gz ] || fail "man -w 5 siterelay.toml"
    [ "$(man -w siterelay-enrol)" = /usr/share/man/man8/siterelay-enrol.8.gz ] || fail "man -w siterelay-enrol"
else
    [ -f /usr/share/man/man8/siterelay.8.gz ] || fail "no siterelay.8.gz"
fi
for f in /usr/share/bash-completion/completions/siterelay /usr/share/zsh/vendor-completions/_siterelay \
    /usr/share/fish/vendor_completions.d/siterelay.fish; do
    grep -q enrol "$f" || fail "$f missing or incomplete"
done
bash -n /usr/share/bash-completion/completions/siterelay || fail "bash completion does not parse"

# The shipped config is the annotated example: it parses, and the only problems are the
# certificate files the central team has not issued yet (named with file, line and key).
# No --config: the default path is the shipped one.
set +e
out="$(env -u SITERELAY_CONFIG /usr/bin/siterelay check-config 2>&1)"
rc=$?
set -e
[ $rc -ne 0 ] || fail "check-config passed without certificates"
echo "$out" | grep -q "/etc/siterelay/siterelay.toml:[0-9]*" || fail "check-config: no file:line in: $out"
echo "$out" | grep -q "ca_file" || fail "check-config did not name ca_file: $out"
if echo "$out" | grep -qiE "unknown (field|key)|expected"; then
    fail "the shipped example config has a syntax or key problem: $out"
fi

# Enrolment on the installed box: the key in /etc/siterelay/tls, owned by the daemon's user.
env -u SITERELAY_CONFIG /usr/bin/siterelay enrol --csr /tmp/smoke-box.csr 2>/dev/null \
    || fail "siterelay enrol failed on the installed box"
[ "$(stat -c '%U %a' /etc/siterelay/tls/client.key)" = "siterelay 600" ] \
    || fail "enrolled key owner/mode: $(stat -c '%U %a' /etc/siterelay/tls/client.key)"
grep -q "BEGIN CERTIFICATE REQUEST" /tmp/smoke-box.csr || fail "no request written"
rm -f /tmp/smoke-box.csr

# Upgrade to the same version: an edited config (conffile) survives, the unit stays enabled.
echo "# edited by the trust" >> /etc/siterelay/siterelay.toml
dpkg -i "$deb" >/dev/null </dev/null || fail "reinstall failed"
grep -q "edited by the trust" /etc/siterelay/siterelay.toml || fail "reinstall replaced an edited config"
[ -L "$WANTS" ] || fail "reinstall lost the enablement"

# The admin disables the unit (what `systemctl disable` does without a running systemd); an
# upgrade to a higher version must keep it disabled.
if ! systemctl disable siterelay.service >/dev/null 2>&1; then
    rm -f "$WANTS"
fi
[ ! -e "$WANTS" ] || fail "could not disable the unit for the test"
work="$(mktemp -d)"
dpkg-deb -R "$deb" "$work/pkg"
version="$(dpkg-deb -f "$deb" Version)"
sed -i "s/^Version: .*/Version: ${version}+smoke1/" "$work/pkg/DEBIAN/control"
dpkg-deb --root-owner-group -b "$work/pkg" "$work/bumped.deb" >/dev/null
dpkg -i "$work/bumped.deb" >/dev/null </dev/null || fail "upgrade to ${version}+smoke1 failed"
[ "$(dpkg-query -W -f '${Version}' siterelay)" = "${version}+smoke1" ] || fail "not upgraded"
[ ! -e "$WANTS" ] || fail "the upgrade re-enabled a unit the admin had disabled"
grep -q "edited by the trust" /etc/siterelay/siterelay.toml || fail "upgrade replaced an edited config"
rm -rf "$work"

# Purge: package files, config and the unit's state gone; the outbox and the box's key kept,
# saying so without sending anyone to the removed binary.
out="$(dpkg --purge siterelay 2>&1)" || fail "purge failed: $out"
[ ! -e /usr/bin/siterelay ] || fail "binary left after purge"
[ ! -e /etc/siterelay/siterelay.toml ] || fail "config left after purge"
[ ! -e /usr/lib/systemd/system/siterelay.service ] || fail "unit left after purge"
[ ! -e /usr/share/man/man8/siterelay.8.gz ] || fail "man page left after purge"
[ ! -e "$WANTS" ] || fail "enablement symlink left after purge"
[ ! -e "$DSH/siterelay.service.dsh-also" ] || fail "deb-systemd-helper state left after purge"
echo "$out" | grep -q "/var/lib/siterelay (the outbox) was kept" || fail "purge does not say the outbox was kept: $out"
echo "$out" | grep -q "/etc/siterelay/tls was kept" || fail "purge does not say the key was kept: $out"
if echo "$out" | grep -qE "siterelay (queue|status|check-config)"; then
    fail "purge tells the user to run the binary it removed: $out"
fi
# This throwaway machine: the enrolled key goes too.
rm -rf /etc/siterelay
echo "smoke-test-deb: ok ($deb)"
