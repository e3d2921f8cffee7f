"""`microvmc doctor`: what this host can run, and what each kernel here can and cannot do.

The host's facts come from the same probe every build uses (backends/host.py); doctor adds what
only a person asks about (QEMU's machine list, limits, the cgroup) and looks at each kernel the way
the pre-flight check does (kernel/requirements.py's FEATURES, from the kernel's config and modules).
`diagnose` gathers; `render` is a pure function of what it gathered (the JSON is the same value).
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microvmc.backends.host import _read  # a file's text, "" when it cannot be read
from microvmc.compiler.host import HostFacts

__all__ = ["diagnose", "render"]

MACHINE_HELP_TIMEOUT = 10.0
LIMITS = {"open files": resource.RLIMIT_NOFILE, "locked memory": resource.RLIMIT_MEMLOCK,
          "processes": resource.RLIMIT_NPROC}
# Below this many open files, a virtiofsd serving a big tree (or several runs at once) runs out.
NOFILE_LOW = 4096


def diagnose(facts: HostFacts, *, root: str = "/") -> dict[str, Any]:
    from microvmc.compiler.hostfiles import HostFiles
    from microvmc.compiler.kernels import DEFAULT_IS_OWN, OwnKernel, own_kernel, own_kernel_dir

    # the own kernel of this fragment, compiler and source, as a build would choose it; else the last built
    node = own_kernel(facts, HostFiles())
    own = node.entry if isinstance(node, OwnKernel) and node.realised else own_kernel_dir(facts)
    kernels = [
        _kernel("microvmc", os.path.join(own, "vmlinux") if own else "", None, os.path.join(own, "config") if own else ""),
        _kernel("debian", os.path.join(facts.default_kernel_dir, "vmlinuz"), os.path.join(facts.default_kernel_dir, "modules"),
                os.path.join(facts.default_kernel_dir, "config")),
        _kernel("host", f"/boot/vmlinuz-{facts.host_kernel_release}", f"/lib/modules/{facts.host_kernel_release}",
                f"/boot/config-{facts.host_kernel_release}"),
    ]
    default = "microvmc" if DEFAULT_IS_OWN and isinstance(node, OwnKernel) and node.realised else "debian"
    return {
        "host": {
            "arch": facts.arch,
            "euid": os.geteuid(),
            "qemu": {"path": facts.qemu, "version": ".".join(map(str, facts.qemu_version)),
                     "microvm": _has_microvm(facts.qemu)},
            "virtiofsd": {"path": facts.virtiofsd or "", "flavour": str(facts.virtiofsd_flavour or ""),
                          "usable": facts.virtiofsd_usable, "reason": facts.virtiofsd_reason},
            "kvm": {"usable": facts.kvm_usable, "reason": facts.kvm_reason},
            "tsc_khz": facts.tsc_khz,
            "limits": _limits(),
            "cgroup": _cgroup(root),
        },
        "kernels": kernels,
        "default_kernel": default,
    }


def _has_microvm(qemu: str) -> bool | None:
    if not qemu:
        return None
    try:
        out = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True,
                             timeout=MACHINE_HELP_TIMEOUT, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return any(line.split()[:1] == ["microvm"] for line in out.splitlines())


def _limits() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, number in LIMITS.items():
        soft, hard = resource.getrlimit(number)
        out[name] = {"soft": None if soft == resource.RLIM_INFINITY else soft,
                     "hard": None if hard == resource.RLIM_INFINITY else hard}
    soft = out["open files"]["soft"]
    out["notes"] = ([f"open files soft limit {soft} < {NOFILE_LOW}: virtiofsd may run out on a big share "
                     "(ulimit -n)"] if soft is not None and soft < NOFILE_LOW else [])
    return out


def _cgroup(root: str) -> dict[str, Any]:
    lines = _read(os.path.join(root, "proc/self/cgroup")).splitlines()
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if unified is None:
        return {"version": 1 if lines else None, "path": "", "memory.max": "", "pids.max": "",
                "notes": ["cgroup v1 (or none): limits of a VM are not microvmc's to read"] if lines else []}
    folder = os.path.join(root, "sys/fs/cgroup", unified.lstrip("/"))
    values = {key: _read(os.path.join(folder, key)).strip() for key in ("memory.max", "pids.max")}
    notes = [f"{key} {value} applies to every VM started from here" for key, value in values.items()
             if value and value != "max"]
    return {"version": 2, "path": unified, **values, "notes": notes}


def _kernel(name: str, image: str, modules: str | None, config_path: str) -> dict[str, Any]:
    from microvmc.kernel.image import embedded_config, extract_vmlinux, inspect_kernel, pvh_entry
    from microvmc.kernel.modules import scan_modules
    from microvmc.kernel.requirements import FEATURES, feature_support, parse_config
    from microvmc.errors import MicrovmcError

    entry: dict[str, Any] = {"name": name, "image": image, "present": bool(image) and os.path.isfile(image)}
    if not entry["present"]:
        return entry
    data = Path(image).read_bytes()
    try:
        info = inspect_kernel(data, path=image)
        entry.update(format=str(info.format), compression=str(info.compression or ""), release=info.release or "")
        entry["pvh"] = pvh_entry(extract_vmlinux(data, path=image), path=image) is not None
    except MicrovmcError as e:
        entry["error"] = str(e)
        return entry
    text = _read(config_path) if os.path.isfile(config_path) else embedded_config(data)
    config = parse_config(text) if text else None
    tree = scan_modules(Path(modules)) if modules and os.path.isdir(modules) else None
    entry["config"] = config_path if os.path.isfile(config_path) else ("embedded" if text else "")
    entry["modules"] = modules if tree else ""
    entry["features"] = {
        key: feature_support(feature, config, tree.builtin if tree else (), tree.modules if tree else None) or "missing"
        for key, feature in FEATURES.items()
    }
    return entry


def render(report: Mapping[str, Any]) -> str:
    """One screen of text."""
    host = report["host"]
    qemu, vfs, kvm = host["qemu"], host["virtiofsd"], host["kvm"]
    microvm = {True: "yes", False: "NO", None: "unknown"}[qemu["microvm"]]
    lines = ["host",
             f"  qemu       {qemu['path'] or 'not found'} {qemu['version']}; microvm machine: {microvm}",
             f"  virtiofsd  {vfs['path'] or 'not found'}" + (f" ({vfs['flavour']})" if vfs["flavour"] else "")
             + f": {'usable' if vfs['usable'] else 'not usable'}, {vfs['reason']}",
             f"  kvm        {'usable' if kvm['usable'] else 'not usable'}: {kvm['reason']}",
             "  limits     " + "; ".join(f"{name} {_limit(v)}" for name, v in host["limits"].items() if name != "notes"),
             f"  cgroup     v{host['cgroup']['version']} {host['cgroup']['path']}"
             + "".join(f"; {k} {host['cgroup'][k]}" for k in ("memory.max", "pids.max") if host["cgroup"].get(k))]
    lines += [f"  note       {note}" for note in (*host["limits"]["notes"], *host["cgroup"]["notes"])]
    lines.append(f"kernels (the default: {report['default_kernel']})")
    for k in report["kernels"]:
        if not k["present"]:
            lines.append(f"  {k['name']:<9} not installed ({k['image'] or 'no kernel directory'})")
            continue
        if "error" in k:
            lines.append(f"  {k['name']:<9} {k['image']}: {k['error']}")
            continue
        how = k["format"] + (f" {k['compression']}" if k["compression"] else "") + (", PVH" if k["pvh"] else ", no PVH")
        lines.append(f"  {k['name']:<9} {k['release']} {k['image']} ({how}; config: {k['config'] or 'none'})")
        by: dict[str, list[str]] = {}
        for feature, support in k["features"].items():
            by.setdefault(support, []).append(feature)
        lines.append("            " + "; ".join(f"{support}: {' '.join(names)}" for support, names in by.items()))
    return "\n".join(lines) + "\n"


def _limit(value: Mapping[str, int | None]) -> str:
    def show(n: int | None) -> str:
        return "unlimited" if n is None else str(n)

    return f"{show(value['soft'])}/{show(value['hard'])}"
