#!/usr/bin/env bash
# Build the root file system of a siterelay box: Debian 12 (bookworm) minimal + siterelay's .deb,
# systemd, time sync, capped journal, SSH with keys only, nftables from the siterelay config, a
# read-only root with an encrypted data partition, first-boot enrolment (image-build/README.md).
#
#   image-build/build-rootfs.sh OUTDIR [--arch amd64|arm64] [--deb PATH] [--binary PATH]
#                               [--authorized-keys FILE] [--no-kernel] [--cache DIR]
#
#   --deb PATH              the siterelay package to install (default: build one with
#                           build-deb.sh, from --binary or a release build for this machine)
#   --binary PATH           package this already built siterelay binary (build-deb.sh --binary)
#   --authorized-keys FILE  SSH public keys for the `admin` user (sudo); without it nobody can log
#                           in over SSH until a key is added (README)
#   --no-kernel             leave out linux-image-* and initramfs (a root file system to check,
#                           not to boot; faster)
#   --cache DIR             keep downloaded .debs here between runs
#                           (default ${XDG_CACHE_HOME:-/var/cache}/siterelay-image/ARCH)
#
# Needs root and Debian's mmdebstrap; arm64 on an amd64 machine also needs qemu-user-static
# and binfmt-support. OUTDIR must not exist or be empty. Check the result with check-rootfs.sh.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
out=""
arch="$(dpkg --print-architecture)"
deb=""
binary=""
keys=""
kernel=1
cache=""
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="$2"; shift 2 ;;
        --deb) deb="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        --authorized-keys) keys="$2"; shift 2 ;;
        --no-kernel) kernel=0; shift ;;
        --cache) cache="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "build-rootfs.sh: unknown option $1" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "build-rootfs.sh: one OUTDIR only" >&2; exit 2; }; out="$1"; shift ;;
    esac
done
[ -n "$out" ] || { echo "usage: build-rootfs.sh OUTDIR [--arch amd64|arm64] [--deb PATH] ..." >&2; exit 2; }
case "$arch" in amd64|arm64) ;; *) echo "build-rootfs.sh: --arch amd64 or arm64, not $arch" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "build-rootfs.sh: run as root (mmdebstrap's root mode, chown in the tree)" >&2; exit 1; }
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "build-rootfs.sh: $out exists and is not empty" >&2; exit 1
fi
[ -z "$keys" ] || [ -r "$keys" ] || { echo "build-rootfs.sh: cannot read $keys" >&2; exit 1; }

need=(mmdebstrap)
[ "$arch" = "$(dpkg --print-architecture)" ] || need+=(qemu-user-static binfmt-support arch-test)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "build-rootfs.sh: installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A foreign tree's package scripts run under qemu-user through binfmt_misc. In a container
# without systemd nothing mounts or registers it: do both (seen on the development machine).
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
    bm=/proc/sys/fs/binfmt_misc
    [ -e "$bm/register" ] || mount -t binfmt_misc binfmt_misc "$bm"
    if [ ! -e "$bm/qemu-aarch64" ] && [ "$arch" = arm64 ]; then
        if [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
            grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > "$bm/register"
        else
            update-binfmts --enable qemu-aarch64
        fi
    fi
fi

# The package: given, or built through build-deb.sh's command line (its only coupling here).
if [ -z "$deb" ]; then
    args=()
    [ -z "$binary" ] || args=(--binary "$binary" --arch "$arch")
    deb="$("$here/build-deb.sh" "${args[@]}" | tail -n 1)"
fi
[ -f "$deb" ] || { echo "build-rootfs.sh: no package at '$deb'" >&2; exit 1; }
deb="$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")"

packages=(
    systemd systemd-sysv systemd-timesyncd systemd-resolved udev dbus
    openssh-server nftables cryptsetup-bin e2fsprogs sudo kmod iproute2 adduser netbase
    # systemd-cryptenroll seals the data partition's key to a TPM 2.0 with these.
    libtss2-esys-3.0.2-0 libtss2-rc0
)
components=main
if [ "$kernel" = 1 ]; then
    if [ "$arch" = arm64 ]; then
        # Raspberry Pi 4/5: Debian's arm64 kernel and the Pi's boot firmware.
        packages+=(linux-image-arm64 initramfs-tools raspi-firmware)
        components=main,non-free-firmware
    else
        packages+=(linux-image-amd64 initramfs-tools)
    fi
fi
include="$(IFS=,; echo "${packages[*]}")"

cache="${cache:-${XDG_CACHE_HOME:-/var/cache}/siterelay-image/$arch}"
mkdir -p "$cache" "$out"

mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
mmdebstrap --mode=root --variant=minbase --arch="$arch" --components="$components" \
    --include="$include" \
    --aptopt='Apt::Install-Recommends "false"' \
    --skip=essential/unlink \
    --setup-hook="mkdir -p \"\$1\"/var/cache/apt/archives/" \
    --setup-hook="sync-in '$cache' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$cache'" \
    --customize-hook="copy-in '$deb' /tmp/" \
    --customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /tmp/$(basename "$deb")" \
    --customize-hook="rm -f \"\$1\"/tmp/$(basename "$deb")" \
    bookworm "$out" \
    "deb $mirror bookworm ${components//,/ }" \
    "deb $mirror bookworm-updates ${components//,/ }" \
    "deb $security bookworm-security ${components//,/ }"

# The image's own files: units, scripts, sshd/journald/network settings, fstab.
cp -a "$here/rootfs/." "$out/"
chown -R root:root "$out/etc/ssh/sshd_config.d" "$out/etc/systemd" "$out/usr/lib/siterelay-image" \
    "$out/usr/lib/systemd/system" "$out/etc/default/siterelay-image" "$out/etc/fstab"

in_root() { chroot "$out" "$@"; }

# Mount points and the data partition's first contents (mkfs.ext4 -d copies owners and modes).
install -d -m 0755 "$out/data"
tpl="$out/usr/lib/siterelay-image/data-template"
install -d -m 0755 "$tpl"
install -d -m 0700 "$tpl/siterelay"
install -d -m 2755 "$tpl/journal"
install -d -m 0755 "$tpl/timesync"
in_root chown siterelay:siterelay /usr/lib/siterelay-image/data-template/siterelay
in_root chown root:systemd-journal /usr/lib/siterelay-image/data-template/journal
in_root chown systemd-timesync:systemd-timesync /usr/lib/siterelay-image/data-template/timesync
install -d -m 0755 "$out/var/log/journal" "$out/var/lib/systemd/timesync"

# The default firewall (SSH only), loaded if the generated one cannot be.
"$out/usr/lib/siterelay-image/firewall-gen" /nonexistent 2>/dev/null > "$out/etc/nftables.conf"
sed -i 's|^# Generated by .*|# siterelay image default: SSH only (siterelay-firewall.service loads the rules generated from the config).|' "$out/etc/nftables.conf"

# Administrators: `admin`, keys only, sudo; no password anywhere, root locked.
in_root useradd --create-home --shell /bin/bash --groups sudo --comment "siterelay administrator" admin
in_root passwd --lock admin >/dev/null
in_root passwd --lock root >/dev/null
install -d -m 0755 "$out/etc/ssh/authorized_keys"
if [ -n "$keys" ]; then
    install -m 0644 "$keys" "$out/etc/ssh/authorized_keys/admin"
fi
echo "admin ALL=(ALL:ALL) NOPASSWD: ALL" > "$out/etc/sudoers.d/admin"
chmod 0440 "$out/etc/sudoers.d/admin"
# Each box makes its own SSH host keys on first boot (siterelay-firstboot.service).
rm -f "$out"/etc/ssh/ssh_host_*

echo siterelay > "$out/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsiterelay\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$out/etc/hosts"
ln -sf /run/systemd/resolve/stub-resolv.conf "$out/etc/resolv.conf"

# Units: enabled here, offline (systemctl enable works without a running systemd).
in_root systemctl enable siterelay.service siterelay-data.service siterelay-firewall.service \
    siterelay-firstboot.service systemd-timesyncd.service systemd-networkd.service \
    systemd-resolved.service ssh.service
# Debian's nftables.service would load /etc/nftables.conf over the generated rules.
in_root systemctl disable nftables.service >/dev/null 2>&1 || true

echo "build-rootfs.sh: $arch root file system in $out ($(du -sh "$out" | cut -f1)); check it with image-build/check-rootfs.sh $out"
