#!/usr/bin/env bash
# Boot an amd64 siterelay image under qemu-system-x86_64 (software emulation unless
# BOOT_TEST_ACCEL=kvm) until siterelay.service reports READY, then power off. Not part of CI (it takes minutes
# of emulated boot); its output is quoted in image-build/README.md.
#
#   image-build/boot-test.sh ROOTFS [WORKDIR]
#
# ROOTFS: a tree from build-rootfs.sh (with its kernel, i.e. without --no-kernel); it is copied,
# not changed. WORKDIR (default: a new directory under /var/tmp) gets the disk images and
# serial.log. The copy gets a test configuration: a throwaway CA and client certificate made here
# with openssl, one MLLP feed on 2575, and a broker address where nothing listens (the box has no
# network), which siterelay must start with anyway (READY, then retrying the broker). A small
# report unit waits for `systemctl is-active siterelay` (Type=notify: active means READY=1),
# prints the state, the journal and the firewall to the serial console and powers off.
#
# The disk: the root file system as an ext4 image (mkfs.ext4 -d: no loop devices, no mounts) on
# the first virtio disk, and a second disk with one GPT partition named siterelay-data, which the
# first boot turns into the LUKS2 data partition (no TPM in this VM: the key-file path).
# Needs root, e2fsprogs, fdisk (sfdisk), openssl, qemu-system-x86 (installed if missing).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
src="${1:-}"
[ -n "$src" ] && [ -d "$src" ] || { echo "usage: boot-test.sh ROOTFS [WORKDIR]" >&2; exit 2; }
work="${2:-$(mktemp -d /var/tmp/siterelay-boot-test.XXXXXX)}"
timeout_secs="${BOOT_TEST_TIMEOUT:-1200}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
[ "$(id -u)" = 0 ] || { echo "boot-test.sh: run as root (the copy keeps the tree's owners)" >&2; exit 1; }

missing=()
for p in qemu-system-x86 e2fsprogs fdisk openssl; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
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

# A throwaway PKI for the test configuration (the broker is never reached).
pki="$work/pki"
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 \
    -subj "/CN=siterelay boot test CA" -keyout "$pki/ca.key" -out "$pki/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=boot-test-01" \
    -keyout "$pki/client.key" -out "$pki/client.csr" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$pki/ext"
openssl x509 -req -in "$pki/client.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 90 -extfile "$pki/ext" -out "$pki/client.pem" 2>/dev/null
for f in ca.pem client.pem; do
    install -m 0640 "$pki/$f" "$root/etc/siterelay/tls/$f"
    chroot "$root" chown root:siterelay "/etc/siterelay/tls/$f"
done
# The private key: readable by its owner only, and the owner is the daemon's user (start-up
# refuses anything else).
install -m 0600 "$pki/client.key" "$root/etc/siterelay/tls/client.key"
chroot "$root" chown siterelay:siterelay /etc/siterelay/tls/client.key

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

# The report: wait for READY (active), show what a person would look at, power off.
cat > "$root/etc/systemd/system/boot-test-report.service" <<'EOF'
[Unit]
Description=siterelay boot test report
After=basic.target

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c '\
  for i in $(seq 1 300); do s=$(systemctl is-active siterelay.service); [ "$s" = active ] && break; \
    [ $((i % 15)) = 0 ] && { echo "BOOT-TEST waiting: siterelay.service $s"; journalctl -b -u siterelay --no-pager -o cat -n 8; }; sleep 2; done; \
  echo "BOOT-TEST siterelay.service is-active: $s"; \
  echo "BOOT-TEST systemctl show: $(systemctl show -p Type -p ActiveState -p SubState -p StatusText siterelay.service | tr "\\n" " ")"; \
  echo "BOOT-TEST --- journal (siterelay units) ---"; \
  journalctl -b --no-pager -o short-monotonic -u siterelay-data -u siterelay-firewall -u siterelay-firstboot -u siterelay; \
  echo "BOOT-TEST --- siterelay status ---"; \
  runuser -u siterelay -- siterelay status || true; \
  echo "BOOT-TEST --- mounts ---"; \
  findmnt -n -o TARGET,SOURCE,FSTYPE,OPTIONS / /data /var/lib/siterelay /var/log/journal; \
  lsblk -o NAME,TYPE,FSTYPE,LABEL,PARTLABEL,MOUNTPOINTS; \
  echo "BOOT-TEST --- nft list ruleset ---"; \
  nft list ruleset; \
  echo "BOOT-TEST --- timesyncd, journald ---"; \
  systemctl is-enabled systemd-timesyncd.service; systemctl is-active systemd-timesyncd.service; \
  journalctl --header | grep -E "^(File path|Disk usage)" | head -n 2; journalctl -b -u systemd-journald --no-pager | grep -E "System Journal|Runtime Journal" | tail -n 2; \
  echo "BOOT-TEST end"; \
  systemctl poweroff'

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable boot-test-report.service >/dev/null 2>&1
# No login prompt on the serial console: systemd stops printing unit status lines there while a
# getty holds it, and this test reads them.
chroot "$root" systemctl mask serial-getty@ttyS0.service >/dev/null 2>&1

# Disks: root as a bare ext4 image (/dev/vda), data as a GPT disk with the named partition.
size_mib=$(( $(du -sm "$root" | cut -f1) + 512 ))
rm -f "$work/root.img" "$work/data.img"
truncate -s "${size_mib}M" "$work/root.img"
mkfs.ext4 -q -F -L siterelay-root -d "$root" "$work/root.img"
truncate -s 256M "$work/data.img"
printf 'label: gpt\nsize=240MiB, name=siterelay-data\n' | sfdisk -q "$work/data.img"

# Software emulation by default: KVM inside this kind of (already virtual) machine did not get
# past the boot loader (seen here); BOOT_TEST_ACCEL=kvm tries it elsewhere.
accel=(-accel "${BOOT_TEST_ACCEL:-tcg}")
echo "boot-test: booting $(basename "$kernel") (${accel[1]}), serial console in $work/serial.log, timeout ${timeout_secs}s"
start=$(date +%s)
set +e
timeout "$timeout_secs" qemu-system-x86_64 "${accel[@]}" -m 1024 -smp 2 -nographic -no-reboot \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "console=ttyS0 root=/dev/vda ro panic=-1 systemd.show_status=1" \
    -drive file="$work/root.img",if=virtio,format=raw \
    -drive file="$work/data.img",if=virtio,format=raw \
    -nic none < /dev/null > "$work/serial.log" 2>&1
rc=$?
set -e
echo "boot-test: qemu exited $rc after $(( $(date +%s) - start )) s"
grep -a 'BOOT-TEST' "$work/serial.log" | head -n 3
if grep -aq 'BOOT-TEST siterelay.service is-active: active' "$work/serial.log"; then
    echo "boot-test: PASSED: siterelay.service reached READY (active) in the booted image"
    exit 0
fi
echo "boot-test: FAILED: no READY; the last of the serial console:" >&2
tail -n 60 "$work/serial.log" >&2
exit 1
