#!/bin/sh
# The least a person would write by hand to boot the microVM that microvmc plans, run the program
# the kernel command line names, and exit with its status: the baseline of bench/run_true.py.
#
# Inputs, from `microvmc plan --json` (run_true.py passes them, so both boot the identical VM):
#   QEMU VIRTIOFSD ROOTFS KERNEL INITRD APPEND MEMORY (e.g. 256M) CPUS ACCEL (tcg, kvm) CPU (-cpu), and
#   CACHE (virtiofsd's cache=: the plan's, `always` for an immutable store-path root; default auto)
# The machine options are the ones the plan uses (microvm, memfd shared memory, modern virtio-mmio,
# the five virtio-serial ports init waits for, virtiofs root served read-only), written out once, no checks.
set -u
: "${QEMU:?}" "${VIRTIOFSD:?}" "${ROOTFS:?}" "${KERNEL:?}" "${INITRD:?}" "${APPEND:?}" "${MEMORY:?}" "${CPUS:?}" "${ACCEL:?}" "${CPU:?}"

dir=$(mktemp -d "${TMPDIR:-/tmp}/baseline-true.XXXXXX") || exit 121
trap 'kill "$fs" 2>/dev/null; wait; rm -rf "$dir" "/var/run/virtiofsd/$(printf %s "$dir/fs.sock" | tr / .).pid"' EXIT

# The root read-only on the host side: a read-only bind mount in virtiofsd's own mount namespace.
unshare --mount --propagation private -- sh -c 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"' \
    - "$ROOTFS" "$VIRTIOFSD" --socket-path="$dir/fs.sock" -o source="$ROOTFS" -o cache="${CACHE:-auto}" -o sandbox=chroot 2>"$dir/virtiofsd.log" &
fs=$!
tries=0
until [ -S "$dir/fs.sock" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 1000 ] || exit 121  # 10 s
    sleep 0.01
done

"$QEMU" -M "${MACHINE:-microvm,memory-backend=mem}" -nodefaults -no-user-config -display none -no-reboot \
    -accel "$ACCEL" -cpu "$CPU" -smp "$CPUS" -m "$MEMORY" \
    -object memory-backend-memfd,id=mem,size="$MEMORY",share=on \
    -global virtio-mmio.force-legacy=false \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" \
    -serial file:"$dir/console.log" \
    -device virtio-serial-device,max_ports=7 \
    -chardev stdio,id=stdin,signal=off -device virtserialport,chardev=stdin,name=stdin \
    -chardev file,id=stdout,path="$dir/stdout" -device virtserialport,chardev=stdout,name=stdout \
    -chardev file,id=stderr,path="$dir/stderr" -device virtserialport,chardev=stderr,name=stderr \
    -chardev file,id=status,path="$dir/status" -device virtserialport,chardev=status,name=status \
    -chardev null,id=control -device virtserialport,chardev=control,name=control \
    -chardev null,id=channel -device virtserialport,chardev=channel,name=channel \
    -chardev socket,id=fs,path="$dir/fs.sock" -device vhost-user-fs-device,chardev=fs,tag=root \
    2>"$dir/qemu.log" || exit 121

# init's last report: "exit N" (anything else counts as a failure here)
status=$(sed -n 's/^exit //p' "$dir/status")
exit "${status:-123}"
