"""config.json's hooks run on the host, as runc runs them (runtime spec, config.md, POSIX-platform
hooks): each hook's `path` executed with its `args` as argv (argv[0] included) and its `env` (none
given: the runtime's own environment), the container's state JSON on stdin, in the runtime's
namespaces, killed after `timeout` seconds. A failure is one line, in runc's words:
`error running prestart hook #0: exit status 1, stdout: ..., stderr: ...`.

stdin, stdout and stderr are files, not pipes: a hook that leaves a child behind holding them
does not hold the runtime up past the hook's own end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from typing import Any, Callable, Mapping

from microvmc.compiler.oci import Hook

__all__ = ["HookFailure", "run_hooks"]

OUTPUT_SHOWN = 400  # characters of a failed hook's stdout and of its stderr in the message


class HookFailure(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _shown(data: bytes) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())  # one line
    return text if len(text) <= OUTPUT_SHOWN else text[:OUTPUT_SHOWN - 3] + "..."


def _run(hook: Hook, state: bytes, cwd: str) -> None:
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin.write(state)
        stdin.seek(0)
        env = None if hook.env is None else dict(e.split("=", 1) for e in hook.env)
        try:
            proc = subprocess.Popen(list(hook.args) or [hook.path], executable=hook.path, stdin=stdin, stdout=out,
                                    stderr=err, env=env, cwd=cwd)
        except OSError as e:
            raise HookFailure(f"fork/exec {hook.path}: {(e.strerror or str(e)).lower()}") from None
        try:
            status = proc.wait(timeout=hook.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HookFailure(f"hook ran past specified timeout of {float(hook.timeout):.1f}s") from None
        except BaseException:  # the runtime itself is interrupted: the hook goes with it
            proc.kill()
            proc.wait()
            raise
        if status != 0:
            out.seek(0)
            err.seek(0)
            how = (f"exit status {status}" if status > 0
                   else f"signal: {(signal.strsignal(-status) or str(-status)).lower()}")
            raise HookFailure(f"error running hook: {how}, stdout: {_shown(out.read())}, stderr: {_shown(err.read())}")


def run_hooks(kind: str, hooks: tuple[Hook, ...], state: Mapping[str, Any], *, cwd: str,
              warn: Callable[[str], None] | None = None) -> None:
    """The hooks of one kind, in order, with `state` on stdin. Without `warn`, the first failure
    raises HookFailure (createRuntime, prestart: create fails); with it, each failure is warned
    about and the rest still run (poststart, poststop, as the runtime spec has it)."""
    data = json.dumps(dict(state), separators=(",", ":")).encode()
    for i, hook in enumerate(hooks):
        try:
            _run(hook, data, cwd if os.path.isdir(cwd) else "/")
        except HookFailure as failure:
            message = f"error running {kind} hook #{i}: {failure.message}"
            if warn is None:
                raise HookFailure(message) from None
            warn(message)
