"""Shared fixtures: a host described as a value, a fixture kernel, the real kernel for boots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from microvmc.compiler.graph import Sources
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
EXAMPLES = REPO / "examples"


def fake_facts(**changes) -> HostFacts:
    """A fixed host, so plans do not depend on the machine the tests run on."""
    base = dict(
        qemu="qemu-system-x86_64",
        qemu_version=(7, 2, 0),
        virtiofsd="/usr/lib/qemu/virtiofsd",
        virtiofsd_flavour=VirtiofsdFlavour.C,
        virtiofsd_usable=True,
        virtiofsd_reason="virtiofsd (/usr/lib/qemu/virtiofsd, c flavour) runs as root",
        kvm_usable=False,
        kvm_reason="/dev/kvm is missing",
        tsc_khz=2_000_000,
        default_kernel_dir=str(FIXTURES / "kernel"),
        host_kernel_release="6.1.0-fixture-amd64",
        busybox=str(FIXTURES / "busybox"),
        cc="gcc",
    )
    base.update(changes)
    return HostFacts(**base)


FIXTURE_SOURCES = Sources(init_source=str(FIXTURES / "init"))


@pytest.fixture
def facts() -> HostFacts:
    return fake_facts()


def real_kernel_dir() -> Path:
    return Path(os.environ.get("MICROVMC_KERNEL_DIR", Path.home() / ".local/share/microvmc/kernel/default"))


def own_kernel_dir() -> Path:
    return real_kernel_dir().parent / "microvmc"


# The boot tests run on the default kernel, microvmc's own (scripts/setup builds it). A smaller set
# also runs on the Debian kernel, the module path (modules found, ordered, put in the initramfs and
# loaded by init): those take `kernel` in KERNELS, and `-m debian` selects them.
KERNELS = ("microvmc", pytest.param("debian", marks=pytest.mark.debian))


def on_kernel(manifest: Path, kernel: str, folder: Path) -> Path:
    """`manifest`, booting `kernel` (a kernel.source): itself for the default, else a manifest of the
    same name in `folder` that imports it and sets kernel.source."""
    if kernel == "microvmc":
        return manifest
    wrapper = folder / kernel / manifest.name
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'version = 1\nimports = ["{manifest}"]\n[kernel]\nsource = "{kernel}"\n')
    return wrapper


@pytest.fixture(scope="session")
def boot_env(tmp_path_factory) -> dict[str, str]:
    """Environment for real boots: a private store and state dir, the real kernels (the default is
    microvmc's own: the suite runs on it)."""
    missing = [tool for tool in ("qemu-system-x86_64", "busybox", "gcc") if not shutil.which(tool)]
    assert not missing, f"real boots need {missing}: run scripts/setup"
    assert (real_kernel_dir() / "vmlinuz").is_file(), f"no kernel at {real_kernel_dir()}: run scripts/setup"
    assert (own_kernel_dir() / "vmlinux").is_file(), \
        f"no own kernel at {own_kernel_dir()}: run scripts/setup (or microvmc kernel build)"
    from microvmc.backends.host import probe_host
    from microvmc.compiler.hostfiles import HostFiles
    from microvmc.compiler.kernels import OwnKernel, own_kernel

    own = own_kernel(probe_host(), HostFiles())  # the one this fragment names: else the default is Debian's
    assert isinstance(own, OwnKernel) and own.realised, \
        f"microvmc's own kernel for this fragment is not built ({own if isinstance(own, str) else own.entry}): " \
        "run microvmc kernel build"
    root = tmp_path_factory.mktemp("boot")
    env = dict(os.environ)
    env.update(
        MICROVMC_STORE=str(root / "store"),
        XDG_STATE_HOME=str(root / "state"),
        XDG_CACHE_HOME=str(root / "cache"),
    )
    return env


def private_runtime(boot_env: dict[str, str], tmp_path_factory) -> dict[str, str]:
    """boot_env with a runtime directory (and TMPDIR) of its own: what a run leaves there shows."""
    env = dict(boot_env)
    runtime = tmp_path_factory.mktemp("runtime")
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env["TMPDIR"] = str(runtime)
    return env


@pytest.fixture(scope="session")
def image_layout(tmp_path_factory) -> Path:
    """The test images as one OCI layout (tests/imagekit.py), the Debian userland included."""
    import imagekit

    for tool in ("umoci", "skopeo", "docker-registry", "mmdebstrap"):
        assert shutil.which(tool) or os.path.exists(f"/usr/bin/{tool}"), f"{tool} is missing: run scripts/setup --test"
    return imagekit.make_layout(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def registry(image_layout, tmp_path_factory):
    """A real registry on 127.0.0.1 holding the test images as OCI, Docker v2s2 and indexes:
    t/bbox:oci, t/bbox:v2s2, t/layered:oci, t/layered:v2s2, t/multi:oci (OCI index),
    t/multi:v2s2 (Docker manifest list), t/debian:oci. Yields host:port."""
    import imagekit

    with imagekit.registry(tmp_path_factory.mktemp("registry")) as host:
        for fmt in ("oci", "v2s2"):
            imagekit.push(image_layout, "bbox", host, f"t/bbox:{fmt}", format=fmt)
            imagekit.push(image_layout, "layered", host, f"t/layered:{fmt}", format=fmt)
            imagekit.push(image_layout, "multi", host, f"t/multi:{fmt}", format=fmt, all_platforms=True)
        imagekit.push(image_layout, "debian", host, "t/debian:oci", format="oci")
        yield host


# The container engines (podman, dockerd, containerd) for the OCI runtime's tests: tests/oci_engines.py.
from oci_engines import busybox_archive, busybox_tree, containerd, docker, engines_root, podman  # noqa: E402,F401
