#!/usr/bin/env bash
# Benchmark: the microvm backend against a floor measured in the same run.
#
#  1. warm `keystone agent start` to a working `exec` (the image's disk and
#     the sandbox's overlay already exist), vs the floor: the same QEMU
#     command line (same kernel, machine, accelerator, memory, vCPUs) with
#     `init=/bin/false`, i.e. the kernel boots, runs one userspace program,
#     panics and QEMU exits (`panic=-1`, `-no-reboot`);
#  2. idle memory overhead: host RSS of QEMU and the supervisor, beyond the
#     memory the guest itself uses (MemTotal - MemFree inside).
#
# Prints absolute figures and ratios. Not a test: nothing here fails on time.
#   sudo ./bench/microvm.sh [ITERATIONS]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
N=${1:-3}
bench_require qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mkfs.ext4:e2fsprogs bc:bc jq:jq
bench_build
bench_project bench microvm 'network = "none"\n'

t0=$(now); $K agent start --no-attach >/dev/null 2>&1; $K agent exec -- true; t1=$(now)
cold=$(ms "$t0" "$t1")

# The QEMU command line the backend uses, and memory while idle.
qpid=$(pgrep -f -- '-name keystone-bench ' | head -1)
mapfile -d '' args < <(cat "/proc/$qpid/cmdline")
spid=$(ps -o ppid= -p "$qpid" | tr -d ' ')
sleep 5
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
qemu_kb=$(rss "$qpid"); sup_kb=$(rss "$spid")
guest_kb=$($K agent exec -- awk '/^MemTotal:/ {t=$2} /^MemFree:/ {f=$2} END {print t-f}' /proc/meminfo)
$K agent stop >/dev/null

# 1. keystone warm start → exec
bench_warm_starts "$N"

# The floor: same command line, init=/bin/false, a scratch overlay, no QMP.
# QEMU is handed descriptors, not paths (qemu::Fds); the floor opens the
# same files by path instead.
base=$(qemu-img info --output=json "$XDG_STATE_HOME/keystone/sandboxes/bench/disk/root.qcow2" | jq -r '."backing-filename"')
kernel=$(dirname "$base")/vmlinuz
: > "$work/floor-config.raw"
floor_args=()
skip=0
for a in "${args[@]:1}"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$a" in
        -add-fd) skip=1; continue ;;
        /proc/self/fd/*) a=$kernel ;;
        *init=/usr/local/sbin/keystone-init*) a=${a/init=\/usr\/local\/sbin\/keystone-init/init=\/bin\/false} ;;
        *filename=/dev/fdset/1,*) a=${a/\/dev\/fdset\/1/$base} ;;
        *filename=/dev/fdset/2,*) a=${a/\/dev\/fdset\/2/$work\/floor.qcow2} ;;
        *filename=/dev/fdset/3,*) a=${a/\/dev\/fdset\/3/$work\/floor-config.raw} ;;
        file,id=console,path=*) a="file,id=console,path=$work/floor-boot.log" ;;
        socket,id=qmp,*) a="socket,id=qmp,path=$work/floor-qmp.sock,server=on,wait=off" ;;
        user,id=ctl,*) a="user,id=ctl,restrict=on" ;;
    esac
    floor_args+=("$a")
done
fl=()
for _ in $(seq "$N"); do
    qemu-img create -q -f qcow2 -F raw -b "$base" "$work/floor.qcow2"
    t0=$(now); qemu-system-x86_64 "${floor_args[@]}" >/dev/null 2>&1 || true; t1=$(now)
    fl+=("$(ms "$t0" "$t1")")
done

ks_m=$(median_of "${warm[@]}")
fl_m=$(median_of "${fl[@]}")
accel=$(printf '%s\n' "${args[@]}" | grep -A1 -x -- -accel | tail -1)
echo "accelerator:                        $accel"
echo "cold first start → exec:            ${cold} ms (makes the sandbox's disk, pushes the repository)"
echo "warm start → exec (median of $N):    ${ks_m} ms   [${warm[*]}]"
echo "floor: kernel → init=/bin/false:    ${fl_m} ms   [${fl[*]}]"
echo "ratio start→exec / floor:           $(ratio "$ks_m" "$fl_m")x (aim: <= 2.5x)"
echo "idle memory: QEMU RSS ${qemu_kb} kB + supervisor RSS ${sup_kb} kB, guest uses ${guest_kb} kB"
echo "idle overhead beyond the guest:     $(( qemu_kb + sup_kb - guest_kb )) kB"
