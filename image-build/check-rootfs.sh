#!/usr/bin/env bash
# Check a root file system made by build-rootfs.sh: what a box needs is there and set as
# image-build/README.md says. Prints one line per check and exits non-zero if any failed.
#
#   image-build/check-rootfs.sh DIR
#
# Reads the tree only (dpkg --admindir, systemctl --root, sshd -T in a chroot, nft --check on
# the generated rules when nft is installed here).
set -uo pipefail

dir="${1:-}"
[ -n "$dir" ] && [ -d "$dir" ] || { echo "usage: check-rootfs.sh DIR" >&2; exit 2; }
dir="$(cd "$dir" && pwd)"
passed=0
failed=0
ok() { echo "ok: $1"; passed=$((passed + 1)); }
bad() { echo "FAILED: $1" >&2; failed=$((failed + 1)); }
check() { # check DESCRIPTION COMMAND...
    local what="$1"; shift
    if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi
}
installed() {
    [ "$(dpkg-query --admindir="$dir/var/lib/dpkg" -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}
enabled() {
    [ "$(systemctl --root="$dir" is-enabled "$1" 2>/dev/null)" = enabled ]
}
contains() { grep -Eq "$2" "$dir/$1"; }

# Packages.
for p in siterelay systemd systemd-timesyncd systemd-resolved openssh-server nftables \
    cryptsetup-bin e2fsprogs sudo; do
    check "package $p installed" installed "$p"
done
check "siterelay binary runs in the tree (--version)" chroot "$dir" /usr/bin/siterelay --version

# Units.
for u in siterelay.service siterelay-data.service siterelay-firewall.service \
    siterelay-firstboot.service systemd-timesyncd.service systemd-networkd.service ssh.service; do
    check "unit $u enabled" enabled "$u"
done
check "nftables.service disabled (siterelay-firewall loads the rules)" \
    sh -c "! systemctl --root='$dir' is-enabled nftables.service | grep -qx enabled"
check "siterelay.service requires the data partition (drop-in)" \
    contains etc/systemd/system/siterelay.service.d/10-image.conf '^Requires=siterelay-data.service'
check "systemd-analyze verifies the image's units" \
    chroot "$dir" systemd-analyze verify --man=no siterelay-data.service siterelay-firewall.service \
        siterelay-firstboot.service

# SSH: what sshd itself makes of its configuration (sshd -T needs host keys: a throwaway one).
sshd_conf() {
    local key
    key="$(mktemp -u /tmp/check-rootfs-hostkey.XXXXXX)"
    ssh-keygen -q -t ed25519 -N '' -f "$dir$key" >/dev/null 2>&1 || return 1
    mkdir -p "$dir/run/sshd"
    chroot "$dir" /usr/sbin/sshd -T -h "$key" -C user=admin,host=x,addr=192.0.2.1 2>/dev/null
    rm -f "$dir$key" "$dir$key.pub"
    rmdir "$dir/run/sshd" 2>/dev/null
}
sshd_out="$(sshd_conf)"
for want in 'permitrootlogin no' 'passwordauthentication no' 'kbdinteractiveauthentication no' \
    'permitemptypasswords no' 'authenticationmethods publickey' \
    'authorizedkeysfile /etc/ssh/authorized_keys/%u'; do
    if grep -qx "$want" <<<"$sshd_out"; then ok "sshd -T: $want"; else bad "sshd -T: $want"; fi
done
check "no SSH host keys in the image (made per box on first boot)" \
    sh -c "! ls '$dir'/etc/ssh/ssh_host_* 2>/dev/null | grep -q ."
check "root's password locked" sh -c "grep -q '^root:[!*]' '$dir/etc/shadow'"
check "admin's password locked" sh -c "grep -q '^admin:!' '$dir/etc/shadow'"

# Journald cap.
check "journald SystemMaxUse set" contains etc/systemd/journald.conf.d/10-siterelay.conf '^SystemMaxUse=[0-9]+[KMG]$'
check "journald persistent (on the data partition)" contains etc/systemd/journald.conf.d/10-siterelay.conf '^Storage=persistent$'

# Time sync.
check "timesyncd enabled (time-sync target reached before siterelay)" enabled systemd-timesyncd.service

# fstab: read-only root, the encrypted data partition, bind mounts, tmpfs.
fstab_has() { awk -v m="$1" -v re="$2" '$1 !~ /^#/ && $2 == m && $0 ~ re { f = 1 } END { exit !f }' "$dir/etc/fstab"; }
check "fstab: / mounted ro" fstab_has / '[ \t]ro(,|[ \t])'
check "fstab: /data from /dev/mapper/siterelay-data" fstab_has /data '^/dev/mapper/siterelay-data[ \t]'
check "fstab: /var/lib/siterelay bound from /data" fstab_has /var/lib/siterelay '^/data/siterelay[ \t]+[^ \t]+[ \t]+none[ \t]+bind'
check "fstab: /var/log/journal bound from /data" fstab_has /var/log/journal '^/data/journal[ \t]'
check "fstab: /tmp is tmpfs" fstab_has /tmp '^tmpfs[ \t]'
tpl="$dir/usr/lib/siterelay-image/data-template/siterelay"
check "data template: siterelay directory owned by siterelay, 0700" \
    sh -c "[ \"\$(chroot '$dir' stat -c '%U %a' /usr/lib/siterelay-image/data-template/siterelay)\" = 'siterelay 700' ]"
[ -d "$tpl" ] || bad "data template missing"
check "data volume script makes LUKS2" contains usr/lib/siterelay-image/data-volume 'luksFormat .*--type luks2'

# Firewall: the generator on the shipped config and on a config with other ports.
gen="$dir/usr/lib/siterelay-image/firewall-gen"
conf_rules="$("$gen" "$dir/etc/siterelay/siterelay.toml" 2>/dev/null)"
ports="$(awk '/^[ \t]*\[\[mllp\]\]/ { m = 1; next } /^[ \t]*\[/ { m = 0 } m && /^[ \t]*listen[ \t]*=/ { match($0, /:[0-9]+"/); print substr($0, RSTART + 1, RLENGTH - 2) }' "$dir/etc/siterelay/siterelay.toml" | sort -n -u | paste -sd, -)"
check "firewall from the shipped config: policy drop" grep -q 'policy drop' <<<"$conf_rules"
check "firewall from the shipped config: SSH" grep -q 'tcp dport 22 accept' <<<"$conf_rules"
only_ports() { # only_ports RULES PORTS: SSH plus exactly one feed line with PORTS
    [ "$(grep -c 'tcp dport' <<<"$1")" = 2 ] && grep -q "tcp dport { $2 } accept" <<<"$1"
}
if [ -n "$ports" ]; then
    check "firewall from the shipped config: the feeds' ports { $ports } and no others" \
        only_ports "$conf_rules" "$ports"
fi
tmpconf="$(mktemp)"
cat > "$tmpconf" <<'EOF'
appliance_id = "check"
[[mllp]]
name = "a"
listen = "[::]:12575"   # IPv6 any
[mllp.tls]
cert_file = "/x:9999"
[[mllp]]
name = "b"
listen = "127.0.0.1:2600"
[[serial]]
listen = "0.0.0.0:7777"
EOF
other="$("$gen" "$tmpconf" 2>/dev/null)"
rm -f "$tmpconf"
check "firewall from another config: exactly the [[mllp]] ports 2600 and 12575" \
    only_ports "$other" 2600,12575
ssh_only() { grep -q 'tcp dport 22 accept' "$1" && [ "$(grep -c 'tcp dport' "$1")" = 1 ]; }
check "the shipped default /etc/nftables.conf admits SSH only" ssh_only "$dir/etc/nftables.conf"
nft_check() { chroot "$dir" /usr/sbin/nft --check -f - <<<"$1"; }
not_run=0
tree_arch="$(dpkg-query --admindir="$dir/var/lib/dpkg" -W -f '${Architecture}' dpkg)"
if [ "$tree_arch" = "$(dpkg --print-architecture)" ]; then
    check "nft --check (the image's nft) accepts the rules from the shipped config" nft_check "$conf_rules"
    check "nft --check accepts the shipped default /etc/nftables.conf" chroot "$dir" /usr/sbin/nft --check -f /etc/nftables.conf
else
    # The image's nft under qemu-user cannot open a netlink socket ("Protocol not supported"),
    # and nft --check needs one. Said, not hidden: the booted image loads them for real.
    echo "NOT RUN: nft --check of the shipped rules: a $tree_arch nft under user-mode emulation has no netlink (image-build/boot-test.sh --arch $tree_arch loads them in the booted image)"
    not_run=2
fi

if [ "$not_run" = 0 ]; then echo "check-rootfs: $passed passed, $failed failed"; else echo "check-rootfs: $passed passed, $failed failed, $not_run not run (above)"; fi
[ "$failed" = 0 ]
