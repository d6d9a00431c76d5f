#!/usr/bin/env bash
# Boot a siterelay image under QEMU (amd64: qemu-system-x86_64, software emulation unless
# BOOT_TEST_ACCEL=kvm; arm64: qemu-system-aarch64's `virt` machine, software emulation), enrol it as an operator would, look
# at the service under the real systemd, optionally upgrade the package while a sender sends,
# then power off. Not part of CI (minutes of emulation); its output is quoted in
# image-build/README.md.
#
#   image-build/boot-test.sh ROOTFS [WORKDIR] [--upgrade-deb DEB] [--arch amd64|arm64]
#
# ROOTFS: a tree from build-rootfs.sh (with its kernel, i.e. without --no-kernel); it is copied,
# not changed. WORKDIR (default: a new directory under /var/tmp) gets the disk images and
# serial.log. The copy gets a test configuration (one MLLP feed on 2575; a broker address where
# nothing listens: the VM has no network, and siterelay must run anyway) and a throwaway CA made
# here with openssl, standing in for the central team. No client key or certificate is put in:
# the first boot makes them. boot-test-report.sh, run inside by a unit, then:
#   1. enrolment: shows the request siterelay-firstboot made (`siterelay enrol`), the key's mode,
#      what siterelay.service did without a certificate; signs the request with the test CA (the
#      openssl command of docs/operations.md), runs `siterelay enrol --install-cert`, starts the
#      service and waits for `systemctl is-active` (Type=notify: active means READY=1);
#   2. the unit under the real systemd: `systemd-analyze security` (online), the sandbox as
#      applied, `siterelay status` and its exit code;
#   3. with --upgrade-deb DEB (a later version of the package): messages sent one at a time with
#      `siterelay send`, each retried until accepted; `dpkg -i DEB` starts after the 60th, and
#      sending goes on until 60 more were accepted after dpkg finished; then the version and the
#      daemon's PID before and after, when the new daemon was READY against the messages'
#      accept times (some must fall on each side), and the store's pending count, which must
#      equal the messages sent (nothing lost, nothing stored twice);
#   4. the journal, mounts, firewall, time sync and journald; then powers off.
#   The daemon's clock line must not say "synchronisation unknown" (adjtimex refused by the
#   unit's system call filter).
# PASSED needs 1, that clock line (and 3 when asked for) to have come out right.
#
# The disk: the root file system as an ext4 image (mkfs.ext4 -d: no loop devices, no mounts) on
# the first virtio disk, and a second disk with one GPT partition named siterelay-data, which the
# first boot turns into the LUKS2 data partition (no TPM in this VM: the key-file path).
# arm64 boots Debian's arm64 kernel from the tree directly on a generic virtual machine: it shows
# the arm64 userland, units and package at work, not the Raspberry Pi's firmware and boot.
# Needs root, e2fsprogs, fdisk (sfdisk), openssl, apt-get (to download the openssl package for
# the stand-in central side), qemu-system-x86 or qemu-system-arm (installed if missing).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
usage="usage: boot-test.sh ROOTFS [WORKDIR] [--upgrade-deb DEB] [--arch amd64|arm64]"
src=""
work=""
upgrade_deb=""
arch="$(dpkg --print-architecture)"
while [ $# -gt 0 ]; do
    case "$1" in
        --upgrade-deb) upgrade_deb="$2"; shift 2 ;;
        --arch) arch="$2"; shift 2 ;;
        -*) echo "boot-test.sh: unknown option $1" >&2; exit 2 ;;
        *) if [ -z "$src" ]; then src="$1"; elif [ -z "$work" ]; then work="$1"; else
               echo "$usage" >&2; exit 2; fi
           shift ;;
    esac
done
[ -n "$src" ] && [ -d "$src" ] || { echo "$usage" >&2; exit 2; }
[ -z "$upgrade_deb" ] || [ -r "$upgrade_deb" ] || { echo "boot-test.sh: cannot read $upgrade_deb" >&2; exit 2; }
work="${work:-$(mktemp -d /var/tmp/siterelay-boot-test.XXXXXX)}"
timeout_secs="${BOOT_TEST_TIMEOUT:-1200}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
[ "$(id -u)" = 0 ] || { echo "boot-test.sh: run as root (the copy keeps the tree's owners)" >&2; exit 1; }

case "$arch" in
    amd64) qemu_pkg=qemu-system-x86; console=ttyS0 ;;
    arm64) qemu_pkg=qemu-system-arm; console=ttyAMA0 ;;
    *) echo "boot-test.sh: --arch amd64 or arm64, not $arch" >&2; exit 2 ;;
esac
missing=()
for p in "$qemu_pkg" e2fsprogs fdisk openssl; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

kernel="$(ls "$src"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)"
initrd="$(ls "$src"/boot/initrd.img-* 2>/dev/null | sort -V | tail -n 1)"
[ -n "$kernel" ] && [ -n "$initrd" ] || { echo "boot-test.sh: no kernel/initrd in $src/boot (built with --no-kernel?)" >&2; exit 1; }

root="$work/root"
rm -rf "$root"
cp -a "$src" "$root"
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"

# A throwaway CA standing in for the central team. Only the CA goes into the test copy (with its
# key, under /root/boot-test, so the report can sign the box's request as the central side
# would); the box makes its own key at first boot.
pki="$work/pki"
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 \
    -subj "/CN=siterelay boot test CA" -keyout "$pki/ca.key" -out "$pki/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
t="$root/root/boot-test"
mkdir -p "$t"
chmod 0700 "$t"
cp "$pki/ca.pem" "$pki/ca.key" "$t/"
# docs/operations.md, "Enrolling a box": the central side's extension file.
printf 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n' > "$t/appliance.ext"
# The image has OpenSSL's library but not its command (a box signs nothing): Debian's openssl
# package for the image's architecture, unpacked beside the report, for the stand-in central
# side only.
if ! chroot "$root" sh -c 'command -v openssl' >/dev/null 2>&1; then
    dpkg --print-foreign-architectures | grep -qx "$arch" || [ "$arch" = "$(dpkg --print-architecture)" ] \
        || { dpkg --add-architecture "$arch"; apt-get update -qq; }
    (cd "$work" && rm -f openssl_*.deb && apt-get download -qq "openssl:$arch")
    dpkg-deb -x "$work"/openssl_*_"$arch".deb "$t/ossl"
fi
[ -z "$upgrade_deb" ] || cp "$upgrade_deb" "$t/upgrade.deb"
install -m 0700 "$here/boot-test-report.sh" "$t/report"
rm -f "$root/etc/siterelay/tls/"*.pem "$root/etc/siterelay/tls/"*.key "$root/etc/siterelay/firstboot.done"

cat > "$root/etc/siterelay/siterelay.toml" <<'EOF'
# siterelay boot test (image-build/boot-test.sh): the broker is unreachable on purpose.
appliance_id = "boot-test-01"
organisation = "RXX"
data_dir = "/var/lib/siterelay"

[mqtt]
host = "127.0.0.1"
port = 8883
ca_file = "/etc/siterelay/tls/ca.pem"
cert_file = "/etc/siterelay/tls/client.pem"
key_file = "/etc/siterelay/tls/client.key"

[[mllp]]
name = "pas-adt"
listen = "0.0.0.0:2575"
allow = ["127.0.0.1/32"]
EOF
chroot "$root" chown root:siterelay /etc/siterelay/siterelay.toml
chmod 0640 "$root/etc/siterelay/siterelay.toml"

# The report (boot-test-report.sh), once the first boot's units are done.
cat > "$root/etc/systemd/system/boot-test-report.service" <<EOF
[Unit]
Description=siterelay boot test report
After=basic.target siterelay-firstboot.service

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/$console
TimeoutStartSec=1200
ExecStart=/root/boot-test/report

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable boot-test-report.service >/dev/null 2>&1
# No login prompt on the serial console: systemd stops printing unit status lines there while a
# getty holds it, and this test reads them.
chroot "$root" systemctl mask "serial-getty@$console.service" >/dev/null 2>&1

# Disks: root as a bare ext4 image (/dev/vda), data as a GPT disk with the named partition.
size_mib=$(( $(du -sm "$root" | cut -f1) + 512 ))
rm -f "$work/root.img" "$work/data.img"
truncate -s "${size_mib}M" "$work/root.img"
mkfs.ext4 -q -F -L siterelay-root -d "$root" "$work/root.img"
truncate -s 256M "$work/data.img"
printf 'label: gpt\nsize=240MiB, name=siterelay-data\n' | sfdisk -q "$work/data.img"

# Software emulation by default: KVM inside this kind of (already virtual) machine did not get
# past the boot loader (seen here); BOOT_TEST_ACCEL=kvm tries it elsewhere (amd64 only).
if [ "$arch" = amd64 ]; then
    qemu=(qemu-system-x86_64 -accel "${BOOT_TEST_ACCEL:-tcg}")
else
    qemu=(qemu-system-aarch64 -machine virt -cpu cortex-a72 -accel tcg)
fi
echo "boot-test: booting $(basename "$kernel") ($arch, ${qemu[*]}), serial console in $work/serial.log, timeout ${timeout_secs}s"
start=$(date +%s)
set +e
timeout "$timeout_secs" "${qemu[@]}" -m 1024 -smp 2 -nographic -no-reboot \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "console=$console root=/dev/vda ro panic=-1 systemd.show_status=1" \
    -drive file="$work/root.img",if=virtio,format=raw \
    -drive file="$work/data.img",if=virtio,format=raw \
    -nic none < /dev/null > "$work/serial.log" 2>&1
rc=$?
set -e
echo "boot-test: qemu exited $rc after $(( $(date +%s) - start )) s"
grep -a 'BOOT-TEST' "$work/serial.log" | grep -av 'BOOT-TEST   ' | head -n 40
log="$work/serial.log"
fail=()
grep -aq 'BOOT-TEST enrol --install-cert exit: 0' "$log" || fail+=("enrol --install-cert did not succeed")
grep -aq 'BOOT-TEST siterelay.service is-active: active' "$log" || fail+=("siterelay.service did not reach READY (active) after enrolment")
# adjtimex inside the sandbox: "unknown" means the unit's system call filter refused it.
line="$(grep -a 'BOOT-TEST clock (the running daemon)' "$log" || true)"
[[ "$line" =~ synchronised ]] && [[ ! "$line" =~ unknown ]] \
    || fail+=("the daemon could not read the clock state under the unit's sandbox: ${line:-no result}")
if [ -n "$upgrade_deb" ]; then
    line="$(grep -a 'BOOT-TEST upgrade: [0-9]* of' "$log" || true)"
    [[ "$line" =~ upgrade:\ ([0-9]+)\ of\ ([0-9]+)\ messages\ accepted,\ [0-9]+\ sends\ retried,\ ([0-9]+)\ pending ]] \
        && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[3]}" ] \
        || fail+=("upgrade: not every message accepted and stored exactly once: ${line:-no result}")
    line="$(grep -a 'BOOT-TEST upgrade: version' "$log" || true)"
    [[ "$line" =~ version\ ([^ ]+)\ -\>\ ([^ ]+),\ MainPID\ ([0-9]+)\ -\>\ ([0-9]+),\ siterelay.service\ active ]] \
        && [ "${BASH_REMATCH[1]}" != "${BASH_REMATCH[2]}" ] && [ "${BASH_REMATCH[3]}" != "${BASH_REMATCH[4]}" ] \
        || fail+=("upgrade: the package was not upgraded and the daemon restarted and active: ${line:-no result}")
    line="$(grep -a 'BOOT-TEST upgrade: the new daemon' "$log" || true)"
    [[ "$line" =~ before\ it:\ ([0-9]+),\ after\ it:\ ([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -gt 0 ] && [ "${BASH_REMATCH[2]}" -gt 0 ] \
        || fail+=("upgrade: the restart did not fall between accepted messages: ${line:-no result}")
fi
if [ ${#fail[@]} = 0 ]; then
    echo "boot-test: PASSED: enrolled at first boot, READY under systemd${upgrade_deb:+, upgraded while sending with nothing lost}"
    exit 0
fi
printf 'boot-test: FAILED: %s\n' "${fail[@]}" >&2
echo "boot-test: the last of the serial console:" >&2
tail -n 60 "$log" >&2
exit 1
