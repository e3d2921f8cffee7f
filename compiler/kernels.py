"""Which kernel a manifest boots, and whether it can do what the plan needs (pre-flight).

    kernel.source = "default"   microvmc's own kernel when it is built (the set-up builds it), else
                                the Debian kernel the set-up installed (MICROVMC_KERNEL_BUILD=0)
    kernel.source = "microvmc"  microvmc's own kernel, or an error saying how to build it
    kernel.source = "debian"    the Debian kernel (vmlinuz + modules) the set-up installed
    kernel.source = "host"      /boot/vmlinuz-$(uname -r) and /lib/modules/$(uname -r)
    kernel.source = "path"      kernel.image, and kernel.modules when it has modules

Own kernels live beside the Debian one: <kernels>/microvmc -> microvmc-<key>/ (vmlinux, config,
...), where <kernels> is the parent of HostFacts.default_kernel_dir (<kernels>/default).

The pre-flight check reads the kernel's own description of itself (its .config beside it or
embedded with CONFIG_IKCONFIG, modules.builtin, the modules present) against kernel/requirements.py,
so a plan that needs something the kernel lacks fails before anything starts, in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from microvmc.compiler.host import HostFacts
from microvmc.compiler.manifest import KernelSource, Manifest, NetworkMode, Transport
from microvmc.errors import KernelError, ManifestError, Problem

__all__ = ["KernelChoice", "choose_kernel", "own_kernel_dir", "required_features", "check_features"]

OWN_KERNEL = "microvmc"  # the link `microvmc kernel build` makes in <kernels>
# Whether "default" prefers the own kernel (when it is built; else the Debian kernel, which says so).
DEFAULT_IS_OWN = True


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelChoice:
    image: str  # what QEMU boots, or the bzImage it is extracted from
    modules: str | None  # lib/modules/<release>; None: everything it needs is built in
    config: str | None  # its .config file, when one is kept beside it
    what: str  # for messages and the graph: "microvmc's own kernel", "the Debian kernel", ...
    own: str  # where the own kernel is looked for: the cache watches it appear or change


def own_kernel_dir(facts: HostFacts) -> str:
    if not facts.default_kernel_dir:
        return ""
    return os.path.join(os.path.dirname(os.path.normpath(facts.default_kernel_dir)), OWN_KERNEL)


def choose_kernel(manifest: Manifest, facts: HostFacts, *, isfile: Callable[[str], bool] = os.path.isfile,
                  isdir: Callable[[str], bool] = os.path.isdir) -> KernelChoice:
    kernel = manifest.kernel
    own = own_kernel_dir(facts)
    own_image = os.path.join(own, "vmlinux") if own else ""

    def missing(what: str, path: str, hint: str) -> ManifestError:
        return ManifestError([Problem(manifest.name, "kernel.source", f"{what} is not installed: {path} is missing", hint)])

    def own_kernel() -> KernelChoice:
        config = os.path.join(own, "config")
        return KernelChoice(image=own_image, modules=None, config=config if isfile(config) else None,
                            what=f"microvmc's own kernel ({os.path.realpath(own)})", own=own_image)

    def modular(image: str, modules: str, what: str, hint: str, note: str = "") -> KernelChoice:
        if not isfile(image) or not isdir(modules):
            raise missing(what, image if not isfile(image) else modules, hint)
        return KernelChoice(image=image, modules=modules, config=_config_beside(image, modules, isfile),
                            what=what + note, own=own_image)

    source = kernel.source
    if source is KernelSource.PATH:
        assert kernel.image
        if kernel.modules is None:
            folder = os.path.dirname(kernel.image)
            config = next((c for c in (os.path.join(folder, "config"), os.path.join(folder, ".config")) if isfile(c)), None)
            return KernelChoice(image=kernel.image, modules=None, config=config, what=f"kernel.image {kernel.image}",
                                own=own_image)
        return KernelChoice(image=kernel.image, modules=kernel.modules,
                            config=_config_beside(kernel.image, kernel.modules, isfile),
                            what=f"kernel.image {kernel.image}", own=own_image)
    if source is KernelSource.HOST:
        release = facts.host_kernel_release
        return modular(f"/boot/vmlinuz-{release}", f"/lib/modules/{release}", "the host's kernel",
                       "set kernel.source = \"path\"")
    if source is KernelSource.MICROVMC or (DEFAULT_IS_OWN and source is KernelSource.DEFAULT and own_image
                                           and isfile(own_image)):
        if not own_image or not isfile(own_image):
            raise missing("microvmc's own kernel", own_image or "<kernels>/microvmc/vmlinux",
                          "run `microvmc kernel build` (or scripts/setup)")
        return own_kernel()
    base = facts.default_kernel_dir
    what = "the Debian kernel" if source is KernelSource.DEBIAN else "the default kernel"
    # the fallback says why it is not the own kernel (the graph shows it)
    note = (" (the Debian kernel: microvmc's own kernel is not built; `microvmc kernel build`)"
            if source is KernelSource.DEFAULT and DEFAULT_IS_OWN else "")
    hint = "run scripts/setup, or set kernel.source = \"path\""
    return modular(os.path.join(base, "vmlinuz"), os.path.join(base, "modules"), what, hint, note)


def _config_beside(image: str, modules_dir: str, isfile: Callable[[str], bool]) -> str | None:
    """The kernel's .config, where a kernel package or build tree keeps it, if anywhere."""
    folder = os.path.dirname(image)
    release = os.path.basename(os.path.normpath(modules_dir))
    for candidate in (os.path.join(folder, "config"), os.path.join(folder, f"config-{release}"),
                      os.path.join(modules_dir, "build", ".config")):
        if isfile(candidate):
            return candidate
    return None


def required_features(manifest: Manifest, root_mode: str) -> tuple[str, ...]:
    """What the plan needs of the kernel (keys of kernel/requirements.py's FEATURES), in the order
    their modules are loaded."""
    transports = sorted({manifest.image.transport, *(s.transport for s in manifest.shares)})
    wanted = ["initramfs", "devtmpfs", "tmpfs", "ports", *(str(t) for t in transports)]
    if root_mode.startswith("overlay"):
        wanted.append("overlay")
    if manifest.network.mode is not NetworkMode.NONE:
        wanted.append("network")
    return tuple(wanted)


# What to do instead, when the kernel lacks a feature.
_INSTEAD = {
    "virtiofs": f'use transport = "{Transport.NINEP}" or another kernel',
    "9p": f'use transport = "{Transport.VIRTIOFS}" or another kernel',
    "overlay": 'use image.mode = "read-only" or another kernel',
    "network": 'use network.mode = "none" or another kernel',
}


def check_features(features: tuple[str, ...], *, image: str, release: str, config: dict[str, str] | None,
                   builtin: frozenset[str] = frozenset(), modules: frozenset[str] | None = None) -> tuple[str, ...]:
    """The modules the plan must load, in order, or a KernelError naming the first feature the
    kernel has neither built in nor as a module."""
    from microvmc.kernel.requirements import FEATURES, feature_support

    load: list[str] = []
    for key in features:
        feature = FEATURES[key]
        support = feature_support(feature, config, builtin, modules)
        if support is None:
            raise KernelError(f"kernel {image} ({release}) has no {feature.name} support, neither built in nor as a "
                              f"module; {_INSTEAD.get(key, 'use another kernel')}")
        if support == "modules":
            load += [m for m in feature.modules if m not in builtin]
    return tuple(load)
