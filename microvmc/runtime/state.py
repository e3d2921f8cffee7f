"""What the OCI runtime says, as values (pure): runc's state document, its features document, its
log lines, and signals as engines and runc's tools write them.

runc's contract is its command line and these documents: engines parse `state`'s JSON and read the
last `"level":"error"` line of the `--log` file when a call fails (containerd's shim matches
"does not exist" and "container not running" in it), so the wording of those errors is runc's.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from microvmc import __version__

__all__ = [
    "OCI_VERSION",
    "NOT_EXIST",
    "NOT_RUNNING",
    "RuntimeFailure",
    "parse_signal",
    "state_document",
    "hook_state",
    "features_document",
    "log_line",
]

OCI_VERSION = "1.0.2"  # of the runtime spec whose state this reports
NOT_EXIST = "container does not exist"
NOT_RUNNING = "container not running"


class RuntimeFailure(Exception):
    """A call that fails: its one-line message goes to stderr and, as runc's, to the --log file."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.message = message
        self.status = status


def parse_signal(text: str) -> int:
    """runc's `kill` signal: 9, KILL, SIGKILL, kill (microvmc's own reading of them)."""
    from microvmc.errors import MicrovmcError
    from microvmc.lifecycle import parse_signal as parse

    try:
        return parse(text)
    except MicrovmcError:
        raise RuntimeFailure(f"unknown signal {text!r}: a name like KILL or SIGTERM, or a number 1-64") from None


def state_document(container_id: str, record: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """runc's `state` output from the run's record and what its monitor (or the record) says now.
    A stopped container's pid is 0, as runc has it; one whose monitor is not up yet is `creating`."""
    oci = record.get("oci") or {}
    status = live.get("state", "stopped")
    pid = live.get("pid") if status != "stopped" else 0
    if status == "created" and not pid:
        status = "creating"
    doc: dict[str, Any] = {
        "ociVersion": oci.get("ociVersion", OCI_VERSION),
        "id": container_id,
        "pid": pid or 0,
        "status": status,
        "bundle": oci.get("bundle", ""),
        "rootfs": oci.get("rootfs", ""),
        "created": oci.get("created", record.get("created", "")),
        "owner": "",
    }
    if oci.get("annotations"):
        doc["annotations"] = dict(oci["annotations"])
    return doc


def hook_state(container_id: str, oci: Mapping[str, Any], status: str, pid: int) -> dict[str, Any]:
    """The state a hook reads on stdin (runtime spec, runtime.md: ociVersion, id, status, pid,
    bundle, annotations); no pid once stopped, as runc's omitempty has it."""
    doc: dict[str, Any] = {"ociVersion": oci.get("ociVersion") or OCI_VERSION, "id": container_id, "status": status,
                           **({"pid": pid} if pid else {}), "bundle": oci.get("bundle", "")}
    if oci.get("annotations"):
        doc["annotations"] = dict(oci["annotations"])
    return doc


def features_document() -> dict[str, Any]:
    """`features` (runtime-spec features.md): what this runtime understands of config.json."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],  # createContainer, startContainer: the guest's
        "mountOptions": ["bind", "rbind", "ro", "rw", "private", "rprivate", "shared", "rshared", "slave",
                         "rslave", "nosuid", "nodev", "noexec", "relatime", "noatime", "strictatime"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts", "user"],
            "capabilities": [],
            "cgroup": {"v1": False, "v2": False, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.github.microvmc.runtime.version": __version__,
            "io.github.microvmc.runtime.isolation": "microvm",
        },
    }


def rfc3339(t: float) -> str:
    """A Unix time as runc writes times: UTC, nanoseconds, "Z"."""
    whole = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1e9):09d}Z"


def log_line(level: str, message: str, *, time: str, format: str) -> str:
    """One line of the --log file, as logrus writes it for runc (json: keys sorted)."""
    if format == "json":
        return json.dumps({"level": level, "msg": message, "time": time}, sort_keys=True, separators=(",", ":")) + "\n"
    return f"time={json.dumps(time)} level={level} msg={json.dumps(message)}\n"
