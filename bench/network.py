"""The network: TCP throughput from the host into the guest over a forward, against the same transfer
to a process on the host; and what a network device costs a boot.

Throughput: one VM (`network.mode = "user"`, a forward from a free host port to the guest's 5001)
runs a busybox script that, round after round, starts `nc -l -p 5001 | wc -c`, says `ready` once
the port listens (/proc/net/tcp), and prints how many bytes arrived. The baseline is the very same
script run on the host by the same busybox, listening on another free port. Each round the host
sends the same bytes to both (order alternating), from connect to the receiver's close, and checks
the count; the result is MB/s of each and the ratio of their median times (VM / host).

Boot cost: `microvmc run` of /bin/true with `network.mode = "user"` against `"none"`, interleaved
(bench/_measure.py), as a ratio of medians and the paired difference.

    python3 bench/network.py [-n 5] [--mib 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

GUEST_PORT = 5001
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
# {port}: where nc listens; {hexport}: the same in /proc/net/tcp's notation; {rounds}: how many.
RECEIVER = ("i=0; while [ $i -lt {rounds} ]; do nc -l -p {port} | wc -c > {count} & "
            "until cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -qi ':{hexport} 0*:0000 0A'; do usleep 20000; done; "
            "echo ready; wait; cat {count}; i=$((i + 1)); done")
TRUE = 'version = 1\n[process]\nargv = ["/bin/true"]\n[network]\nmode = "{mode}"\n'
CHUNK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver_script(port: int, rounds: int, count: str) -> str:
    return RECEIVER.format(port=port, hexport=f"{port:04X}", rounds=rounds, count=count)


def send(port: int, size: int) -> float:
    """Seconds from connect to the receiver closing, for `size` bytes sent to 127.0.0.1:`port`."""
    payload = bytes(CHUNK)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        left = size
        while left:
            left -= s.send(payload[:min(left, CHUNK)])
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):  # until the receiver has read everything and closed
            pass
    return time.perf_counter() - start


class Receiver:
    """One side's receiver: a process printing `ready` before each round and the byte count after."""

    def __init__(self, label: str, argv: list[str], port: int, env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.label, self.port = label, port
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=cwd, start_new_session=True)

    def line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"{self.label}: ended ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
        return line.strip()

    def transfer(self, size: int) -> float:
        if (said := self.line()) != "ready":
            raise RuntimeError(f"{self.label}: said {said!r} instead of ready")
        seconds = send(self.port, size)
        if (count := self.line()) != str(size):
            raise RuntimeError(f"{self.label}: received {count} bytes of {size}")
        return seconds

    def close(self) -> None:
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def throughput(microvmc: tuple[str, ...], tmp: str, *, reps: int, warmup: int, mib: int,
               progress: bool) -> dict:
    rounds = reps + warmup
    size = mib << 20
    vm_port, host_port = free_port(), free_port()
    manifest = os.path.join(tmp, "receiver.toml")
    with open(manifest, "w") as f:
        script = receiver_script(GUEST_PORT, rounds, "/tmp/count")
        f.write(f'version = 1\n[image]\nmode = "overlay"\n[resources]\nmemory = 512\n'
                f'[process]\nargv = ["/bin/sh", "-c", {json.dumps(script)}]\n'
                f'[network]\nmode = "user"\nforwards = [{{ host = {vm_port}, guest = {GUEST_PORT} }}]\n')
    sides = {
        "vm": Receiver("guest over the forward", [*microvmc, "run", manifest], vm_port, cwd=tmp),
        "host": Receiver("host process", [BUSYBOX, "sh", "-c", receiver_script(host_port, rounds,
                                                                              os.path.join(tmp, "count"))],
                         host_port),
    }
    samples: dict[str, list[m.Sample]] = {"vm": [], "host": []}
    try:
        for r in range(rounds):
            for key in (("vm", "host") if r % 2 == 0 else ("host", "vm")):
                seconds = sides[key].transfer(size)
                if r >= warmup:
                    samples[key].append(m.Sample(wall=seconds, cpu=0.0, maxrss_kib=0, status=0))
                if progress:
                    tag = "warm-up" if r < warmup else f"{r - warmup + 1}/{reps}"
                    print(f"  [{tag}] {sides[key].label}: {mib} MiB in {seconds:.3f} s", file=sys.stderr, flush=True)
    finally:
        for side in sides.values():
            side.close()
    return {
        "mib": mib,
        "columns": {key: {"label": sides[key].label, **m.summarize(samples[key]),
                          "mb_per_s_median": size / 1e6 / m.median([s.wall for s in samples[key]])}
                    for key in samples},
        "vm_vs_host": m.ratio_block(samples, "vm", "host"),
    }


def boot_cost(microvmc: tuple[str, ...], tmp: str, *, reps: int, warmup: int, progress: bool) -> dict:
    commands = []
    for mode in ("user", "none"):
        path = os.path.join(tmp, f"true-{mode}.toml")
        with open(path, "w") as f:
            f.write(TRUE.format(mode=mode))
        commands.append(m.Command(key=mode, label=f"microvmc run /bin/true, network.mode = {mode!r}",
                                  argv=(*microvmc, "run", path), cwd=tmp))
    samples = m.interleave(commands, reps, warmup=warmup, progress=progress)
    return {
        "commands": {c.key: {"label": c.label, **m.summarize(samples[c.key])} for c in commands},
        "user_vs_none": m.ratio_block(samples, "user", "none"),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    m.add_common_args(parser, reps=5)
    parser.add_argument("--mib", type=int, default=32, help="MiB sent in each transfer (default 32)")
    args = parser.parse_args(argv)
    microvmc = m.microvmc_command(args.microvmc)
    m.become_subreaper()
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-network-") as tmp:
        result = {
            "machine": m.machine(),
            "throughput": throughput(microvmc, tmp, reps=args.reps, warmup=args.warmup, mib=args.mib,
                                     progress=not args.quiet),
            "boot": boot_cost(microvmc, tmp, reps=args.reps, warmup=args.warmup, progress=not args.quiet),
        }
    result["left_running"] = list(m.sweep_leftovers())
    t, b = result["throughput"], result["boot"]
    rows = [[c["label"], f"{c['wall_median_s']:.3f}", f"{c['mb_per_s_median']:.1f}"] for c in t["columns"].values()]
    text = m.table(rows, [f"{t['mib']} MiB host -> ...", "median s", "MB/s"])
    r = t["vm_vs_host"]
    text += (f"\nguest / host time: {r['of_medians']:.2f} (ratio of medians), {r['median_of_paired']:.2f} "
             "(median of paired)\n\n")
    rows = [[c["label"], f"{c['wall_median_s']:.3f}", f"{c['wall_min_s']:.3f}"] for c in b["commands"].values()]
    text += m.table(rows, ["boot", "median s", "min s"])
    r = b["user_vs_none"]
    text += (f"\nwith a network device / without: {r['of_medians']:.3f} (ratio of medians), "
             f"{r['delta_paired_median_s'] * 1000:+.0f} ms (median of paired differences)")
    m.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
