#!/usr/bin/env bash
# Assemble a Raspberry Pi 4 SD-card image (Pi 400, CM4 too; a Pi 5 needs a kernel with the
# bcm2712 device trees, which Debian 12's 6.1 has not: they are copied when present) from an
# arm64 root file system made by `build-rootfs.sh OUTDIR --arch arm64` (Debian's linux-image-arm64 and raspi-firmware in it).
#
#   image-build/build-pi-image.sh ROOTFS OUT.img [--root-mib N] [--data-mib N]
#
# The card (GPT, which the Pi 4's boot ROM reads):
#   1. RASPIFIRM  FAT32, 256 MiB: the Pi firmware (start4.elf, fixup4.dat, ...), the kernel and
#                 initramfs, the Pi 4 device trees, config.txt and cmdline.txt
#                 (root=LABEL=siterelay-root ro)
#   2. siterelay-root  ext4, the tree (mounted read-only at run time; fstab in the tree)
#   3. siterelay-data  left empty: the first boot makes it the LUKS2 data partition
#                 (siterelay-data.service), so no key is ever in the image
# Nothing is mounted and no loop device is used (mkfs.ext4 -d, mkfs.vfat -C and mtools), so it
# runs in a container. Write it with `dd if=OUT.img of=/dev/sdX bs=4M conv=fsync` or Raspberry
# Pi Imager's "Use custom". Needs root (to read the tree), e2fsprogs, dosfstools, mtools, fdisk.
#
# It prints the partition table and the boot partition's files at the end. Not checked here:
# booting on a Pi (no hardware here). The same arm64 tree boots on QEMU's generic
# arm64 machine (boot-test.sh --arch arm64), which skips the Pi's firmware.
set -euo pipefail

src=""
out=""
root_mib=""
data_mib=512
while [ $# -gt 0 ]; do
    case "$1" in
        --root-mib) root_mib="$2"; shift 2 ;;
        --data-mib) data_mib="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "build-pi-image.sh: unknown option $1" >&2; exit 2 ;;
        *) if [ -z "$src" ]; then src="$1"; elif [ -z "$out" ]; then out="$1"; else
               echo "usage: build-pi-image.sh ROOTFS OUT.img" >&2; exit 2; fi
           shift ;;
    esac
done
[ -n "$src" ] && [ -n "$out" ] && [ -d "$src" ] || { echo "usage: build-pi-image.sh ROOTFS OUT.img [--root-mib N] [--data-mib N]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "build-pi-image.sh: run as root (the tree's files are root's)" >&2; exit 1; }
missing=()
for p in e2fsprogs dosfstools mtools fdisk; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

fw="$src/usr/lib/raspi-firmware"
kernel="$(ls "$src"/boot/vmlinuz-*-arm64 2>/dev/null | sort -V | tail -n 1)"
initrd="$(ls "$src"/boot/initrd.img-*-arm64 2>/dev/null | sort -V | tail -n 1)"
[ -f "$fw/start4.elf" ] || { echo "build-pi-image.sh: no Pi firmware in $fw (an arm64 tree from build-rootfs.sh --arch arm64?)" >&2; exit 1; }
[ -n "$kernel" ] && [ -n "$initrd" ] || { echo "build-pi-image.sh: no arm64 kernel/initrd in $src/boot" >&2; exit 1; }
kver="${kernel##*/vmlinuz-}"
dtbdir="$src/usr/lib/linux-image-$kver/broadcom"
[ -d "$dtbdir" ] || { echo "build-pi-image.sh: no device trees in $dtbdir" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. The boot partition's files.
boot="$work/boot"
mkdir -p "$boot"
cp -a "$fw"/. "$boot/"
cp "$kernel" "$boot/vmlinuz"
cp "$initrd" "$boot/initrd.img"
cp "$dtbdir"/bcm2711-rpi-*.dtb "$boot/" 2>/dev/null || true
cp "$dtbdir"/bcm2712-rpi-*.dtb "$boot/" 2>/dev/null || true
ls "$boot"/bcm2711-rpi-4-b.dtb >/dev/null || { echo "build-pi-image.sh: no Pi 4 device tree in $dtbdir" >&2; exit 1; }
cat > "$boot/config.txt" <<'EOF'
# siterelay image for the Raspberry Pi 4/5 (image-build/build-pi-image.sh).
arm_64bit=1
enable_uart=1
upstream_kernel=1
kernel=vmlinuz
initramfs initrd.img followkernel
# No display is needed: give the GPU the least memory.
gpu_mem=16
disable_splash=1
EOF
# Serial console on the GPIO UART and the screen; the root by label, read-only (fstab).
echo "console=ttyS1,115200 console=tty0 root=LABEL=siterelay-root ro rootwait fsck.repair=yes net.ifnames=0 cma=64M" > "$boot/cmdline.txt"

# 2. The partitions as files.
boot_mib=256
[ -n "$root_mib" ] || root_mib=$(( $(du -sm "$src" | cut -f1) * 12 / 10 + 256 ))
truncate -s "${boot_mib}M" "$work/boot.img"
mkfs.vfat -F 32 -n RASPIFIRM "$work/boot.img" >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -s -i "$work/boot.img" "$boot"/* ::/
truncate -s "${root_mib}M" "$work/root.img"
mkfs.ext4 -q -F -L siterelay-root -d "$src" "$work/root.img"

# 3. The card: GPT with the three partitions, 1 MiB aligned.
total=$(( 1 + boot_mib + root_mib + data_mib + 1 ))
rm -f "$out"
truncate -s "${total}M" "$out"
sfdisk -q "$out" <<EOF
label: gpt
start=1MiB, size=${boot_mib}MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=RASPIFIRM
size=${root_mib}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=siterelay-root
size=${data_mib}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=siterelay-data
EOF
dd if="$work/boot.img" of="$out" bs=1M seek=1 conv=notrunc status=none
dd if="$work/root.img" of="$out" bs=1M seek=$(( 1 + boot_mib )) conv=notrunc status=none

echo "build-pi-image.sh: $out ($(du -h --apparent-size "$out" | cut -f1), kernel $kver)"
sfdisk -l "$out" | sed -n '/^Device/,$p'
echo "boot partition:"
MTOOLS_SKIP_CHECK=1 mdir -b -i "$out@@1M" ::/ | sed 's|^::/|  |' | sort | tr '\n' ' '
echo
echo "cmdline.txt: $(cat "$boot/cmdline.txt")"
