#!/bin/sh
# microvmc 0.1.0 launch script for 'shares', compiled from:
#   /tmp/microvmc-golden/examples/shares.toml
# Runs the VM on its own: starts virtiofsd, boots QEMU, connects the program's stdin, stdout
# and stderr to this script's, and exits with the program's exit status. Generated: rebuild, don't edit.
set -u

# The runtime directory, where microvmc's own runs keep theirs, locked while this script lives:
# if it is SIGKILLed, the next `microvmc run` removes it (backends/qemu.py: sweep_runtime_dirs).
base=${XDG_RUNTIME_DIR:-}
[ -n "$base" ] && [ -d "$base" ] || base=${TMPDIR:-/tmp}
rundir=$(mktemp -d "$base/microvmc-XXXXXX") || exit 121
if command -v flock >/dev/null 2>&1; then  # (without a lock, a sweep leaves the directory alone)
    exec 7>"$rundir/.lock" && flock -n 7
fi
pids=""
cleanup() {
    for pid in $pids; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -f "/var/run/virtiofsd/$(printf %s "$rundir/"fs-root.sock | tr / .).pid"
    rm -f "/var/run/virtiofsd/$(printf %s "$rundir/"fs-data.sock | tr / .).pid"
    rm -rf "$rundir"
}
trap cleanup EXIT
# resources.stop_timeout: a signal is passed on to the program once it runs, which then has
# 10 s to end; a second signal, or one before the program runs, stops the VM
stop_signal=""
stop() {
    if [ -n "$stop_signal" ] || [ -z "${qemu:-}" ] || ! grep -q '^started' status 2>/dev/null; then
        exit $((128 + $1))
    fi
    stop_signal=$1
    printf 'signal %s\n' "$1" >&8  # to init's control port (init/PROTOCOL.md)
    ( watch 10 stop-timed-out '' ) 7>&- &
    pids="$pids $!"
}
trap 'stop 1' HUP
trap 'stop 2' INT
trap 'stop 15' TERM
watch() {  # seconds, file, pattern: unless status matches the pattern first, mark the file, stop QEMU
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM  # (its sleep runs in the background: cleanup stops it at once)
    left=$1
    while [ "$left" -gt 0 ]; do
        kill -0 $$ 2>/dev/null || exit 0  # this script is gone (SIGKILL): so is QEMU
        [ -n "$3" ] && grep -q "$3" status 2>/dev/null && exit 0
        sleep 1 & nap=$!; wait "$nap"; left=$((left - 1))
    done
    : > "$2"; kill "$qemu" 2>/dev/null
}
# QEMU and virtiofsd die with this script, even when it is SIGKILLed (util-linux setpriv)
die_with_us=""
command -v setpriv >/dev/null 2>&1 && die_with_us="setpriv --pdeathsig KILL --"
exec 9<&0  # the program's stdin, kept for QEMU (a background job would get /dev/null)
cd "$rundir" || exit 121
command -v python3 >/dev/null 2>&1 || { echo "microvmc: launch.sh needs python3 (its output relays)" >&2; exit 121; }

wait_for_socket() {  # socket, pid, description, log: wait at most 10 s
    tries=0
    until [ -S "$1" ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 1000 ] || ! kill -0 "$2" 2>/dev/null; then
            echo "microvmc: $3 did not start: $(tail -n 1 "$4")" >&2; exit 121
        fi
        sleep 0.01
    done
}

# image.path, image.transport, image.mode: share 'root', /microvmc/store/7illbsd6rxc2cfvtxjafugckbea7ghko-busybox-rootfs (read-only)
$die_with_us unshare --mount --propagation private -- sh -c 'dir=$1; shift; mount --bind -- "$dir" "$dir" && mount -o remount,bind,ro -- "$dir" && exec "$@"' microvmc-read-only /microvmc/store/7illbsd6rxc2cfvtxjafugckbea7ghko-busybox-rootfs /usr/lib/qemu/virtiofsd -o source=/microvmc/store/7illbsd6rxc2cfvtxjafugckbea7ghko-busybox-rootfs -o cache=always -o sandbox=chroot "--socket-path=$rundir/"fs-root.sock 2>virtiofsd-root.log 7>&- &
pids="$pids $!"
wait_for_socket fs-root.sock $! 'virtiofsd for share root' virtiofsd-root.log

# shares.data: share 'data', /tmp/microvmc-golden/examples/data (read-only)
$die_with_us unshare --mount --propagation private -- sh -c 'dir=$1; shift; mount --bind -- "$dir" "$dir" && mount -o remount,bind,ro -- "$dir" && exec "$@"' microvmc-read-only /tmp/microvmc-golden/examples/data /usr/lib/qemu/virtiofsd -o source=/tmp/microvmc-golden/examples/data -o cache=auto -o sandbox=chroot "--socket-path=$rundir/"fs-data.sock 2>virtiofsd-data.log 7>&- &
pids="$pids $!"
wait_for_socket fs-data.sock $! 'virtiofsd for share data' virtiofsd-data.log

# the microvm machine: no firmware, no PCI, no default devices
set -- \
    qemu-system-x86_64 \
    -M microvm,memory-backend=mem \
    -nodefaults \
    -no-user-config \
    -display none \
    -no-reboot
# resources.accel: accelerator: auto: KVM is not usable (/dev/kvm is missing)
set -- "$@" \
    -accel tcg \
    -cpu max,-erms,-fsrm
# resources.cpus, resources.memory: CPUs and memory; a shared memfd so virtiofsd can map guest memory
set -- "$@" \
    -smp 1 \
    -m 256M \
    -object memory-backend-memfd,id=mem,size=256M,share=on
# vhost-user-fs needs modern (non-legacy) virtio-mmio
set -- "$@" \
    -global virtio-mmio.force-legacy=false
# kernel.source, kernel.cmdline, process, hostname: kernel, initramfs (init + modules), and the command line that configures init
set -- "$@" \
    -kernel /microvmc/store/f5rhunnrvv6p53ivm4gkgd46ao5qzwp6-kernel/kernel \
    -initrd /microvmc/store/dr3ewk37p32kze7l7ff7bbtosotmjxeu-initramfs/initramfs.cpio.gz \
    -append 'console=ttyS0 reboot=t panic=-1 loglevel=6 earlyprintk=serial,ttyS0 cryptomgr.notests tsc_early_khz=2000000 tsc=reliable noreplace-smp no_timer_check MVMC_ROOT=virtiofs:root:overlay MVMC_HOSTNAME=shares MVMC_CWD=/ MVMC_S0=virtiofs:data:ro:/data MVMC_A0=/bin/sh MVMC_A1=-c MVMC_A2=cat%20/data/message.txt%20%26%26%20echo%20scratch%20%3E%20/scratch.txt%20%26%26%20cat%20/scratch.txt MVMC_E0=PATH=/usr/local/sbin%3A/usr/local/bin%3A/usr/sbin%3A/usr/bin%3A/sbin%3A/bin'
# guest console (kernel messages) to fd 5, the run's console log
set -- "$@" \
    -serial chardev:console \
    -chardev file,id=console,path=/dev/fd/5,append=on
# process: the program's stdin, stdout and stderr, init's status reports and the host's requests (signals for the program): separate virtio-serial ports
set -- "$@" \
    -device virtio-serial-device,max_ports=7 \
    -chardev stdio,id=stdin,signal=off \
    -device virtserialport,chardev=stdin,name=stdin \
    -chardev file,id=stdout,path=/dev/fd/1,append=on \
    -device virtserialport,chardev=stdout,name=stdout \
    -chardev file,id=stderr,path=/dev/fd/3,append=on \
    -device virtserialport,chardev=stderr,name=stderr \
    -chardev file,id=status,path=/dev/fd/4,append=on \
    -device virtserialport,chardev=status,name=status \
    -chardev pipe,id=control,path=/dev/fd/6 \
    -device virtserialport,chardev=control,name=control \
    -chardev socket,id=channel,path=channel.sock,server=on,wait=off \
    -device virtserialport,chardev=channel,name=channel
# image.path, image.transport, image.mode: share 'root': /microvmc/store/7illbsd6rxc2cfvtxjafugckbea7ghko-busybox-rootfs over virtiofs (read-only)
set -- "$@" \
    -chardev socket,id=fs-root,path=fs-root.sock \
    -device vhost-user-fs-device,chardev=fs-root,tag=root
# shares.data: share 'data': /tmp/microvmc-golden/examples/data over virtiofs (read-only)
set -- "$@" \
    -chardev socket,id=fs-data,path=fs-data.sock \
    -device vhost-user-fs-device,chardev=fs-data,tag=data

# The program's output goes through pipes, so that a regular file as this script's stdout keeps
# one shared offset (QEMU reopening /dev/fd/1 would write at its own).
mkfifo stdout.pipe stderr.pipe control.pipe || exit 121
exec 8<>control.pipe  # requests to init; opened read-write, so neither side waits for the other
if [ -t 9 ]; then  # a terminal keeps its line mode (QEMU would make it raw): cat relays it
    mkfifo stdin.pipe || exit 121
    cat <&9 >stdin.pipe 7>&- &
    pids="$pids $!"
    exec 9<stdin.pipe
fi
# The relays count what they pass on: init ends the VM only once told that every byte it `sent`
# has been read (`drained`, init/PROTOCOL.md), because QEMU drops the output it still holds when the
# VM ends. A reader that goes away (`| head`) is told to init, which closes the program's end: it gets EPIPE.
relay='
import os, select, sys
name = sys.argv[1].encode()
out, got, want, broken, seen = 1 if name == b"stdout" else 2, 0, None, False, -1
while True:
    try:
        size = os.stat("status").st_size if want is None else seen
    except OSError:
        size = seen
    if size != seen:
        with open("status", "rb") as f:
            report = f.read()
        seen = len(report)
        for fields in (line.split(b" ") for line in report.split(b"\n")):
            if len(fields) == 3 and fields[:2] == [b"sent", name] and fields[2].isdigit():
                want = int(fields[2])
    if want is not None and want >= 0 and got >= want:
        os.write(8, b"drained " + name + b"\n")
        want = -1
    if want is None and not select.select([3], [], [], 0.02)[0]:
        continue
    data = os.read(3, 65536)
    if not data:
        break
    got += len(data)
    while data and not broken:
        try:
            data = data[os.write(out, data):]
        except BlockingIOError:
            select.select([], [out], [])
        except OSError:
            broken = True
            os.write(8, b"close " + name + b"\n")
'
python3 -I -S -c "$relay" stdout 3<stdout.pipe 7>&- &
relays="$!"
python3 -I -S -c "$relay" stderr 3<stderr.pipe 7>&- &
relays="$relays $!"
$die_with_us "$@" 0<&9 1>stdout.pipe 3>stderr.pipe 4>status 5>console.log 6<&8 2>qemu.log 7>&- 8<&- 9<&- &
qemu=$!
pids="$pids $qemu"
# resources.boot_timeout: the program must start within 60 s
( watch 60 timed-out '^started' ) 7>&- &
pids="$pids $!"
while :; do
    wait "$qemu"
    qemu_status=$?
    kill -0 "$qemu" 2>/dev/null || break  # still there: a signal interrupted the wait
done
wait $relays  # all output is delivered before the status

# init's report on the status port (init/PROTOCOL.md) → the exit status
code=123
message="the VM stopped without reporting the program's status"
while read -r kind a b; do
    case "$kind" in
        exit) code=$a; message=""; break ;;
        signal) code=$((128 + a)); message=""; break ;;
        error)
            code=120; message="guest init failed at $a: ${b#* }"
            if [ "$a" = exec ]; then
                message="cannot run the program in the guest: ${b#* }"
                code=126
                case "${b%% *}" in
                1) code=126 ;;
                2) code=127 ;;
                8) code=126 ;;
                13) code=126 ;;
                20) code=127 ;;
                esac
            fi
            break ;;
    esac
done < status
if [ -e stop-timed-out ]; then
    code=$((128 + stop_signal))
    message="the program did not end within 10 s of signal $stop_signal (resources.stop_timeout); the VM was stopped"
elif [ -e timed-out ]; then
    code=124; message="the program did not start or finish in time"
elif [ "$code" = 123 ] && [ "$qemu_status" != 0 ] && [ -s qemu.log ]; then
    code=121; message="QEMU failed: $(head -n 1 qemu.log)"
fi
if [ -n "$message" ]; then
    echo "microvmc: $message" >&2
    tail -n 20 console.log >&2
fi
exit "$code"
