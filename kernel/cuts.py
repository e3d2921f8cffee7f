"""Boot cuts chosen from what a kernel is: kernel parameters that skip work a distribution kernel
does at every boot and a microVM under TCG pays dearly for, each chosen only when the kernel's config
says the kernel does that work (so microvmc's own kernel, whose fragment has none of it, gets none).

Measured on Debian's 6.1 kernel under TCG with bench/boot_ab.py (bench/RESULTS.md, "The Debian
kernel's boot"): traces with host stamps of each console line and samples of the guest's program
counter. A manifest's kernel.cmdline comes after these, so it can undo any of them (`rodata=on`,
`init_on_alloc=1`); an initcall_blacklist of its own adds to this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Cut", "PARAMETERS", "SKIPPED_INITCALLS", "boot_cuts"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Cut:
    when: str  # the config option (without CONFIG_) that must be built in ("y") for the cut to apply
    what: str  # a kernel parameter, or an initcall's name for initcall_blacklist=
    reason: str


PARAMETERS: tuple[Cut, ...] = (
    Cut(when="INIT_ON_ALLOC_DEFAULT_ON", what="init_on_alloc=0",
        reason="every page the kernel allocates is zeroed first (a hardening default): under TCG clear_page was "
               "the boot's most sampled function, 9 % of the samples (the virtio console's receive buffers, the "
               "modules, page tables); memory that reaches a program is zeroed either way, and the own kernel "
               "does not do it"),
    Cut(when="DEBUG_WX", what="rodata=off",
        reason="after making its text read-only the kernel walks every page-table entry looking for writable "
               "and executable mappings (CONFIG_DEBUG_WX: 0.14 s of the traced boot, 7 % of the samples); no "
               "parameter skips only the walk, so the kernel's text stays writable: a guest kernel running one "
               "program, which the VM isolates from the host either way"),
)

# initcall_blacklist=: initcalls a microVM's boot does not need; each only checks or tests.
SKIPPED_INITCALLS: tuple[Cut, ...] = (
    Cut(when="DYNAMIC_FTRACE", what="ftrace_check_for_weak_functions",
        reason="a background worker looks up each of ~40,000 ftrace call sites in kallsyms, only to mark the "
               "sites of overridden weak functions untraceable (they are never called); it holds the one vCPU for "
               "3 % of the boot's samples, and without it function tracing in the guest still works"),
    Cut(when="CRYPTO_KDF800108_CTR", what="crypto_kdf108_init",
        reason="the SP800-108 KDF's self-test, the only thing this initcall does (the KDF's functions need no "
               "set-up); the crypto manager's self-tests are off anyway (cryptomgr.notests)"),
)


def boot_cuts(config: Mapping[str, str] | None) -> tuple[str, ...]:
    """The parameters for a kernel with this .config (parsed; None: unknown, so none)."""
    if config is None:
        return ()
    params = [cut.what for cut in PARAMETERS if config.get(cut.when) == "y"]
    skipped = [cut.what for cut in SKIPPED_INITCALLS if config.get(cut.when) == "y"]
    if skipped:
        params.append("initcall_blacklist=" + ",".join(skipped))
    return tuple(params)
