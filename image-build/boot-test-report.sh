#!/bin/sh
# The report of image-build/boot-test.sh: runs inside the booted test image as
# /root/boot-test/report (boot-test-report.service, output on the serial console, every line the
# host script reads starts with BOOT-TEST), then powers the machine off. Not for a real box: it
# signs the box's request with a throwaway CA standing in for the central team.
say() { echo "BOOT-TEST $*"; }
t=/root/boot-test
ossl=openssl
if ! command -v openssl >/dev/null 2>&1; then
    # Debian's openssl package, unpacked here by boot-test.sh (the image has only the library).
    ossl=$t/ossl/usr/bin/openssl
    export OPENSSL_CONF=$t/ossl/etc/ssl/openssl.cnf
fi
main_pid() { systemctl show -p MainPID --value siterelay.service; }
wait_active() {
    for _ in $(seq 1 150); do
        s=$(systemctl is-active siterelay.service)
        [ "$s" = active ] && break
        sleep 2
    done
    echo "$s"
}

say "--- 1. enrolment ---"
csr=/var/lib/siterelay/enrol.csr
for _ in $(seq 1 60); do [ -s "$csr" ] && break; sleep 1; done
say "siterelay-firstboot: $(systemctl is-active siterelay-firstboot.service)"
journalctl -b -u siterelay-firstboot -o cat --no-pager | sed 's/^/BOOT-TEST   | /'
say "key: $(stat -c '%n mode %a owner %U' /etc/siterelay/tls/client.key 2>&1)"
say "request: $($ossl req -in "$csr" -noout -verify -subject 2>&1 | tr '\n' ' ')"
say "request asks for: $($ossl req -in "$csr" -noout -text 2>/dev/null | grep -A1 'Extended Key Usage' | tr -s ' \n' ' ')"
# systemd starts siterelay.service once the first boot's units are done: wait for its first try.
for _ in $(seq 1 60); do
    [ "$(systemctl show -p NRestarts --value siterelay.service)" -ge 1 ] 2>/dev/null && break
    [ "$(systemctl is-active siterelay.service)" = failed ] && break
    sleep 1
done
say "siterelay.service is-enabled: $(systemctl is-enabled siterelay.service)"
say "without a certificate, siterelay.service is $(systemctl is-active siterelay.service) (NRestarts=$(systemctl show -p NRestarts --value siterelay.service)); its last words:"
systemctl status siterelay.service --no-pager -l -n 4 2>&1 | tail -n 4 | sed 's/^/BOOT-TEST   | /'
# The central side signs (docs/operations.md's command), the operator installs.
# (-CAserial: the serial file goes to /tmp; the root file system is read-only.)
$ossl x509 -req -in "$csr" -CA $t/ca.pem -CAkey $t/ca.key -CAserial /tmp/ca.srl -CAcreateserial \
    -days 825 -sha256 -extfile $t/appliance.ext -out /tmp/box.pem 2>&1 | sed 's/^/BOOT-TEST   openssl | /'
mount -o remount,rw /
siterelay enrol --install-cert /tmp/box.pem --ca $t/ca.pem > /tmp/enrol.out 2>&1
rc=$?
mount -o remount,ro /
sed 's/^/BOOT-TEST   | /' /tmp/enrol.out
say "enrol --install-cert exit: $rc"
systemctl reset-failed siterelay.service
systemctl start siterelay.service
s=$(wait_active)
say "siterelay.service is-active: $s"
say "systemctl show: $(systemctl show -p Type -p ActiveState -p SubState -p StatusText siterelay.service | tr '\n' ' ')"

say "--- 2. the unit under systemd ---"
systemd-analyze security siterelay.service --no-pager 2>&1 | tail -n 1 | sed 's/^/BOOT-TEST security: /'
say "sandbox as applied: $(systemctl show -p User -p ProtectSystem -p ProtectHome -p PrivateTmp -p PrivateDevices -p DevicePolicy -p NoNewPrivileges -p MemoryDenyWriteExecute -p RestrictNamespaces -p SystemCallArchitectures -p CapabilityBoundingSet siterelay.service | tr '\n' ' ')"
pid=$(main_pid)
say "MainPID $pid runs as $(ps -o user= -p "$pid")"
runuser -u siterelay -- siterelay status > /tmp/status.out 2>&1
rc=$?
sed 's/^/BOOT-TEST   | /' /tmp/status.out
say "status exit: $rc (1 = degraded: no broker is reachable from this VM)"

if [ -f $t/upgrade.deb ]; then
    say "--- 3. upgrade while sending ---"
    v0=$(dpkg-query -W -f '${Version}' siterelay)
    pid0=$(main_pid)
    # Send one message at a time; after the 60th, upgrade in the background; go on until the
    # upgrade is over and 60 more have been accepted by whatever daemon then runs.
    retries=0
    : > /tmp/accepted
    rm -f /tmp/dpkg.done
    i=1
    after=0
    while [ $after -lt 60 ]; do
        printf 'MSH|^~\\&|BOOTTEST|RXX|SITERELAY|HUB|20261203120000||ADT^A01^ADT_A01|UPG%04d|P|2.4\rEVN|A01|20261203120000\rPID|1||9990000018^^^NHS^NH||TEST^UPGRADE||19800615|F\rPV1|1|I\r' $i > /tmp/m.hl7
        if [ $i = 61 ]; then
            (mount -o remount,rw / && DEBIAN_FRONTEND=noninteractive dpkg -i $t/upgrade.deb > /tmp/dpkg.log 2>&1
             echo "dpkg exit $?" >> /tmp/dpkg.log
             mount -o remount,ro /
             touch /tmp/dpkg.done) &
        fi
        # A sender retries until it has an accept, as an HL7 interface engine does.
        until siterelay send --to 127.0.0.1:2575 --timeout-secs 10 /tmp/m.hl7 > /tmp/send.out 2>&1; do
            retries=$((retries + 1))
            [ $retries -gt 600 ] && { say "sender gave up at message $i"; break 2; }
            sleep 0.1
        done
        echo "UPG$i $(cut -d' ' -f1 /proc/uptime)" >> /tmp/accepted
        [ -e /tmp/dpkg.done ] && after=$((after + 1))
        i=$((i + 1))
        [ $i -gt 5000 ] && { say "the upgrade did not finish within 5000 messages"; break; }
    done
    n=$((i - 1))
    wait
    s=$(wait_active)
    v1=$(dpkg-query -W -f '${Version}' siterelay)
    pid1=$(main_pid)
    sed 's/^/BOOT-TEST   dpkg | /' /tmp/dpkg.log
    pending=$(runuser -u siterelay -- siterelay queue stats --json | grep -o '"pending":[0-9]*' | cut -d: -f2)
    say "upgrade: version $v0 -> $v1, MainPID $pid0 -> $pid1, siterelay.service $s"
    say "upgrade: $(cut -d' ' -f1 /tmp/accepted | sort -u | wc -l) of $n messages accepted, $retries sends retried, $pending pending in the store"
    # When the new daemon became READY (seconds since boot), and how the messages fell around it.
    up=$(systemctl show -p ActiveEnterTimestampMonotonic --value siterelay.service)
    up=$(awk -v u="$up" 'BEGIN { printf "%.3f", u / 1e6 }')
    say "upgrade: the new daemon READY at ${up} s since boot; messages accepted before it: $(awk -v u="$up" '$2 < u' /tmp/accepted | wc -l), after it: $(awk -v u="$up" '$2 >= u' /tmp/accepted | wc -l) (first at $(head -n 1 /tmp/accepted | cut -d' ' -f2) s, last at $(tail -n 1 /tmp/accepted | cut -d' ' -f2) s)"
    journalctl -b -u siterelay -o short-monotonic --no-pager | grep -iE 'stopp|started|shutdown|stopping|listening' | tail -n 8 | sed 's/^/BOOT-TEST   | /'
fi

say "--- 4. the box ---"
# health.clock comes from adjtimex inside the daemon's sandbox: "unknown" means the unit's
# system call filter refused it.
say "clock (the running daemon): $(runuser -u siterelay -- siterelay status 2>&1 | grep '^clock' | tr -s ' ')"
echo "BOOT-TEST --- journal (siterelay units) ---"
journalctl -b --no-pager -o short-monotonic -u siterelay-data -u siterelay-firewall -u siterelay-firstboot -u siterelay | tail -n 40
echo "BOOT-TEST --- mounts ---"
findmnt -n -o TARGET,SOURCE,FSTYPE,OPTIONS / /data /var/lib/siterelay /var/log/journal
lsblk -o NAME,TYPE,FSTYPE,LABEL,PARTLABEL,MOUNTPOINTS
echo "BOOT-TEST --- nft list ruleset ---"
nft list ruleset
echo "BOOT-TEST --- timesyncd, journald ---"
systemctl is-enabled systemd-timesyncd.service
systemctl is-active systemd-timesyncd.service
journalctl --header | grep -E "^(File path|Disk usage)" | head -n 2
echo "BOOT-TEST end"
systemctl poweroff
