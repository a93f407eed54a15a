#!/bin/sh
# /init of the corral "tiny" test guest (busybox sh). Built into initrd.img by guests/build.py.
#
# Console protocol (serial ttyS0 via /dev/console):
#   CORRAL-FACT <key>=<value>   zero or more facts about the guest
#   CORRAL-GUEST-READY          everything below is up; a root shell follows on the console
#   CORRAL-POWERDOWN            printed by the ACPI power-button handler just before poweroff -f
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp /var/log /var/run
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
ln -sf /proc/self/fd /dev/fd 2>/dev/null
exec </dev/console >/dev/console 2>&1
read -r init_start _ </proc/uptime

# Kernel modules, dependencies first (order computed at build time from modinfo depends=).
# Built-in or absent modules are skipped quietly.
kver=$(uname -r)
if [ -f /etc/modules.order ]; then
    while read -r mod; do
        [ -n "$mod" ] && insmod "/lib/modules/$kver/$mod" 2>/dev/null
    done </etc/modules.order
fi

hostname corral-tiny
ip link set lo up
ip addr add 127.0.0.1/8 dev lo 2>/dev/null

# Let devices settle briefly (virtio probing is asynchronous).
n=0
while [ $n -lt 10 ] && [ ! -e /sys/class/net/eth0 ] && [ -z "$(ls /sys/bus/virtio/devices 2>/dev/null)" ]; do
    sleep 0.05
    n=$((n + 1))
done

if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -b -q -t 5 -T 1 -i eth0 -s /etc/udhcpc/default.script -p /run/udhcpc.pid \
        >/run/udhcpc.log 2>&1 &
fi

# ACPI power button (QMP system_powerdown) -> /etc/acpi/PWRF/00000080 -> sync; poweroff -f.
# busybox acpid's built-in map turns evdev KEY_POWER into "PWRF" and runs /etc/acpi/PWRF/00000080.
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid

# Hot-plugged CPUs are left offline, as on a guest without a udev rule: bringing them online
# is the runner's job (guest agent guest-set-vcpus), and the tests check that it does.

# /dev/virtio-ports/<name> symlinks (udev's job on a real system) + qemu-ga (respawned).
link_virtio_ports() {
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        read -r pname <"$p/name" 2>/dev/null
        [ -n "$pname" ] || continue
        mkdir -p /dev/virtio-ports
        [ -e "/dev/virtio-ports/$pname" ] || ln -sf "../${p##*/}" "/dev/virtio-ports/$pname"
    done
}
link_virtio_ports
mkdir -p /run/qemu-ga /var/lib/qemu-ga
(
    while :; do
        link_virtio_ports
        if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
            qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
                -t /run/qemu-ga -f /run/qemu-ga.pid >>/run/qemu-ga.log 2>&1
        fi
        sleep 0.5
    done
) </dev/null &
if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
    n=0
    while [ $n -lt 20 ] && ! pidof qemu-ga >/dev/null; do
        sleep 0.05
        n=$((n + 1))
    done
fi

read -r up _ </proc/uptime
echo "CORRAL-FACT kernel=$kver"
echo "CORRAL-FACT cpus_online=$(cat /sys/devices/system/cpu/online)"
echo "CORRAL-FACT nproc=$(nproc)"
echo "CORRAL-FACT mem_kb=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)"
echo "CORRAL-FACT qga=$(pidof qemu-ga >/dev/null && echo running || echo absent)"
echo "CORRAL-FACT tpm=$([ -e /dev/tpm0 ] && echo present || echo absent)"
echo "CORRAL-FACT init_start=$init_start"
echo "CORRAL-FACT uptime=$up"
echo "CORRAL-GUEST-READY"

# Root shell on the console with job control; respawned if it exits. The subshell is not a
# process-group leader, so setsid does not fork and we really wait for the shell.
while :; do
    (exec setsid cttyhack sh -l)
    sleep 0.2
done
