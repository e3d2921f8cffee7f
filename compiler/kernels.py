"""Which kernel a manifest boots, and whether it can do what the plan needs (pre-flight).

    kernel.source = "default"   microvmc's own kernel when it is built (the set-up builds it), else
                                the Debian kernel the set-up installed (MICROVMC_KERNEL_BUILD=0)
    kernel.source = "microvmc"  microvmc's own kernel, or an error saying how to build it
    kernel.source = "debian"    the Debian kernel (vmlinuz + modules) the set-up installed
    kernel.source = "host"      /boot/vmlinuz-$(uname -r) and /lib/modules/$(uname -r)
    kernel.source = "path"      kernel.image, and kernel.modules when it has modules

Own kernels live beside the Debian one: <kernels>/microvmc-<key>/ (vmlinux, config, ...), where
<kernels> is the parent of HostFacts.default_kernel_dir (<kernels>/default). microvmc's own kernel is
a node the build makes (`OwnKernel`): its key is computed from its inputs (the Linux source's digest,
kernel/requirements.py's fragment, the compiler), never from a kernel that is there, so resolve
plans it whether it is built or not, from the recipe: the fragment says what it has (the build
refuses a config that lost any of it). `realised` says whether <kernels>/microvmc-<key> is complete.
The other kernels are files that exist: sources, read (their config, modules, release) by content.

The pre-flight check reads the kernel's own description of itself (its .config beside it or
embedded with CONFIG_IKCONFIG, modules.builtin, the modules present) against kernel/requirements.py,
so a plan that needs something the kernel lacks fails before anything starts, in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from microvmc.compiler.host import HostFacts
from microvmc.compiler.hostfiles import HostFiles
from microvmc.compiler.manifest import KernelSource, Manifest, NetworkMode, Transport
from microvmc.errors import KernelError, ManifestError, Problem

__all__ = ["KernelChoice", "OwnKernel", "choose_kernel", "own_kernel", "own_kernel_dir", "kernels_dir", "build_key",
           "source_digest", "SOURCE_MEMO", "DEFAULT_SOURCE", "required_features", "check_features"]

OWN_KERNEL = "microvmc"  # the link `microvmc kernel build` makes in <kernels>: the last one built
# Whether "default" prefers the own kernel (when it is built; else the Debian kernel, which says so).
DEFAULT_IS_OWN = True
DEFAULT_SOURCE = "/usr/src/linux-source-6.1.tar.xz"  # Debian's linux-source-6.1
# <kernels>/SOURCE_MEMO, written by `microvmc kernel build`: the source it last built from (the own
# kernel's source from then on) and each source's digest by its fingerprint, so that resolve need not
# hash 130 MB of tarball to know the key.
SOURCE_MEMO = "sources.json"
KERNEL_BUILDER_VERSION = 1  # bumped when the kernel build's output changes for the same inputs
ARCH = "x86_64"


def build_key(source_digest: str, fragment_digest: str, edits_digest: str, cc_version: str) -> str:
    """The own kernel's key: what it is built from (the source, the fragment, the edits to the source:
    kernel/patches.py), and by what."""
    blob = json.dumps({"builder": KERNEL_BUILDER_VERSION, "source": source_digest, "fragment": fragment_digest,
                       "edits": edits_digest, "cc": cc_version, "arch": ARCH}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def kernels_dir(facts: HostFacts) -> str:
    if not facts.default_kernel_dir:
        return ""
    return os.path.dirname(os.path.normpath(facts.default_kernel_dir))


def read_memo(kernels: str, files: HostFiles) -> dict:
    """<kernels>/sources.json, or {} when there is none or it is damaged (a memo only saves time)."""
    path = os.path.join(kernels, SOURCE_MEMO)
    if not kernels or not files.is_file(path):
        return {}
    try:
        memo = json.loads(files.read(path))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remembered(memo: dict, source: str) -> list | None:
    """The memo's [fingerprint, digest] of a source, when it has a well-formed one."""
    digests = memo.get("digests")
    known = digests.get(source) if isinstance(digests, dict) else None
    return known if isinstance(known, list) and len(known) == 2 and isinstance(known[1], str) else None


def source_digest(source: str, files: HostFiles, memo: dict | None = None) -> str | None:
    """A Linux source's digest (None when it is not there): a tarball by content (the memo's digest
    while the file's fingerprint is the one it was taken with), a tree by where it is and its Makefile
    (it is not hashed whole)."""
    if files.is_file(source):
        known = _remembered(memo or {}, source)
        if known and known[0] is not None and files.fingerprint(source) == known[0]:
            return known[1]
        return "sha256:" + files.digest(source)
    if files.is_dir(source):
        makefile = files.read(os.path.join(source, "Makefile"))
        return "tree:" + hashlib.sha256(files.realpath(source).encode() + b"\0" + makefile).hexdigest()
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class OwnKernel:
    """microvmc's own kernel as a node the build makes: keyed by its inputs, built or not."""

    source: str  # the Linux source tarball or tree
    source_digest: str
    fragment_digest: str
    edits_digest: str  # kernel/patches.py
    cc: str  # the compiler that builds it
    cc_version: str
    key: str
    entry: str  # <kernels>/microvmc-<key>
    realised: bool  # the entry is complete (its build.json is written last)
    buildable: bool = True  # its source is there (else only a built entry can be used)

    @property
    def image(self) -> str:
        return os.path.join(self.entry, "vmlinux")


def own_kernel(facts: HostFacts, files: HostFiles, source: str | None = None) -> OwnKernel | str:
    """The own kernel's node for this fragment, compiler and source, or why it cannot be built here.
    `source`: the Linux source (default: the one `microvmc kernel build` last used, else Debian's)."""
    from microvmc.kernel.patches import edits_digest
    from microvmc.kernel.requirements import fragment_digest

    kernels = kernels_dir(facts)
    if not kernels:
        return "no kernel directory is known"
    memo = read_memo(kernels, files)
    if source is None:
        source = memo.get("source") if isinstance(memo.get("source"), str) else DEFAULT_SOURCE
    if not facts.cc or not facts.cc_version:
        return "no C compiler is installed to build it"
    digest, buildable = source_digest(source, files, memo), True
    if digest is None:
        # gone since (a tarball removed to save space): the digest it had when it was built from
        # names the kernel built then, which can still be used, not built again
        known = _remembered(memo, source)
        if not known:
            return f"its source {source} is missing"
        digest, buildable = known[1], False
    fragment, edits = fragment_digest(), edits_digest()
    key = build_key(digest, fragment, edits, facts.cc_version)
    entry = os.path.join(kernels, f"{OWN_KERNEL}-{key}")
    return OwnKernel(source=source, source_digest=digest, fragment_digest=fragment, edits_digest=edits, cc=facts.cc,
                     cc_version=facts.cc_version, key=key, entry=entry, buildable=buildable,
                     realised=files.is_file(os.path.join(entry, "build.json")))


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelChoice:
    image: str  # what QEMU boots, or the bzImage it is extracted from
    modules: str | None  # lib/modules/<release>; None: everything it needs is built in
    config: str | None  # its .config file, when one is kept beside it
    what: str  # for messages and the graph: "microvmc's own kernel", "the Debian kernel", ...
    own: OwnKernel | None = None  # microvmc's own kernel: a node the build makes, not a file read now


def own_kernel_dir(facts: HostFacts) -> str:
    """<kernels>/microvmc: the link to the own kernel built last (doctor, the tests)."""
    kernels = kernels_dir(facts)
    return os.path.join(kernels, OWN_KERNEL) if kernels else ""


def choose_kernel(manifest: Manifest, facts: HostFacts, files: HostFiles | None = None, *,
                  own_source: str | None = None) -> KernelChoice:
    """Which kernel the manifest boots. The own kernel is chosen by its key, whether it is built
    or not ("microvmc": the build makes it); "default" takes it only when it is built."""
    files = files or HostFiles()
    kernel = manifest.kernel
    isfile, isdir = files.is_file, files.is_dir
    source = kernel.source

    def missing(what: str, path: str, hint: str) -> ManifestError:
        return ManifestError([Problem(manifest.name, "kernel.source", f"{what} is not installed: {path} is missing", hint)])

    def modular(image: str, modules: str, what: str, hint: str, note: str = "") -> KernelChoice:
        if not isfile(image) or not isdir(modules):
            raise missing(what, image if not isfile(image) else modules, hint)
        return KernelChoice(image=image, modules=modules, config=_config_beside(image, modules, isfile),
                            what=what + note)

    if source is KernelSource.PATH:
        assert kernel.image
        if kernel.modules is None:
            folder = os.path.dirname(kernel.image)
            config = next((c for c in (os.path.join(folder, "config"), os.path.join(folder, ".config")) if isfile(c)), None)
            return KernelChoice(image=kernel.image, modules=None, config=config, what=f"kernel.image {kernel.image}")
        return KernelChoice(image=kernel.image, modules=kernel.modules,
                            config=_config_beside(kernel.image, kernel.modules, isfile),
                            what=f"kernel.image {kernel.image}")
    if source is KernelSource.HOST:
        release = facts.host_kernel_release
        return modular(f"/boot/vmlinuz-{release}", f"/lib/modules/{release}", "the host's kernel",
                       "set kernel.source = \"path\"")
    own = own_kernel(facts, files, own_source) if source in (KernelSource.MICROVMC, KernelSource.DEFAULT) else None
    if source is KernelSource.MICROVMC or (DEFAULT_IS_OWN and isinstance(own, OwnKernel) and own.realised):
        if not isinstance(own, OwnKernel) or not (own.realised or own.buildable):
            why = own if not isinstance(own, OwnKernel) else f"its source {own.source} is missing"
            raise ManifestError([Problem(manifest.name, "kernel.source",
                                         f"microvmc's own kernel cannot be built here: {why}",
                                         "Debian: apt-get install linux-source-6.1 gcc; or set kernel.source = \"debian\"")])
        return KernelChoice(image=own.image, modules=None, config=None, own=own,
                            what=f"microvmc's own kernel ({own.entry})")
    base = facts.default_kernel_dir
    what = "the Debian kernel" if source is KernelSource.DEBIAN else "the default kernel"
    # the fallback says why it is not the own kernel (the graph shows it)
    note = f" (the Debian kernel: {_not_own(own)})" if source is KernelSource.DEFAULT and DEFAULT_IS_OWN else ""
    hint = "run scripts/setup, or set kernel.source = \"path\""
    return modular(os.path.join(base, "vmlinuz"), os.path.join(base, "modules"), what, hint, note)


def _not_own(own: OwnKernel | str | None) -> str:
    """Why "default" is not the own kernel."""
    if isinstance(own, OwnKernel) and own.buildable:
        return f"microvmc's own kernel is not built ({own.entry}); `microvmc kernel build`"
    return "microvmc's own kernel cannot be built: " + (f"its source {own.source} is missing" if isinstance(own, OwnKernel) else str(own))


def _config_beside(image: str, modules_dir: str, isfile) -> str | None:
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
    network = manifest.network
    if network.mode is not NetworkMode.NONE:
        wanted.append("network")
        # init sets IPv6 addresses with the others: user mode always has QEMU's (fec0::15), a
        # namespace's interface when it has any (an IP literal with ':' is IPv6)
        if network.mode in (NetworkMode.USER, NetworkMode.ISOLATED) or network.gateway6 \
                or any(":" in a for a in (network.address or "", *network.addresses)):
            wanted.append("ipv6")
    return tuple(wanted)


# What to do instead, when the kernel lacks a feature.
_INSTEAD = {
    "virtiofs": f'use transport = "{Transport.NINEP}" or another kernel',
    "9p": f'use transport = "{Transport.VIRTIOFS}" or another kernel',
    "overlay": 'use image.mode = "read-only" or another kernel',
    "network": 'use network.mode = "none" or another kernel',
    "ipv6": 'use network.mode = "none" or another kernel',
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
