"""A VM on a Linux network namespace's network, the way Kata joins one: in the namespace, a tap
device for QEMU, joined to the namespace's interface (a container engine's veth) by tc ingress
qdiscs with `mirred egress redirect` filters both ways. The guest has the interface's MAC and
address, so what the engine's network sends to the interface reaches the guest, and what the guest
sends leaves through the interface.

Netlink through pyroute2 (links, addresses, routes, tc), not `ip`/`tc` output. The tap is made by a
thread that has entered the namespace (setns applies to the calling thread only): a tap is created in
the namespace of whoever opens /dev/net/tun.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from microvmc.compiler.manifest import Network, NetworkMode
from microvmc.errors import HostError

__all__ = ["Observed", "observe", "namespace_network", "tap_joined", "NetnsError", "new_namespace",
           "remove_namespace", "join", "holder", "same_namespace"]

CLONE_NEWNET = 0x40000000
MS_BIND, MNT_DETACH = 0x1000, 0x2
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000  # the ingress qdisc's handle, "ffff:"
TAP_NAME = "mvmc%d"  # the kernel picks the number
# What marks a redirect filter as microvmc's: its priority and its u32 classid ("mvmc"; `tc filter
# show` says "pref 28022 ... flowid 6d76:6d63"), so that one a SIGKILLed run left can be told apart.
FILTER_PRIO = 0x6D76
FILTER_MARK = 0x6D766D63


class NetnsError(HostError):
    """The namespace or its interface is not what a VM can be joined to."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Observed:
    """A namespace's interface as the guest takes it over."""

    interface: str
    mac: str
    address: str  # "10.88.0.5/16", its first IPv4 address; "" when it has none
    gateway: str  # the IPv4 default route's; "" without one
    mtu: int
    addresses: tuple[str, ...] = ()  # its other addresses, IPv4 then IPv6 ("fd00::5/64"), link-local ones left out
    gateway6: str = ""  # the IPv6 default route's; "" without one


def _ipr(namespace: str) -> Any:
    try:
        from pyroute2 import IPRoute
    except ImportError as e:  # a dependency (pyproject.toml); missing only in a broken install
        raise HostError("pyroute2 is not installed: network.mode = \"netns\" needs it") from e
    if not os.path.exists(namespace):
        raise NetnsError(f"network namespace {namespace} does not exist")
    try:
        return IPRoute(netns=namespace)
    except OSError as e:
        raise NetnsError(f"cannot enter network namespace {namespace}: {e.strerror or e}") from e


def _interface(ipr: Any, namespace: str, interface: str | None) -> Any:
    links = [link for link in ipr.get_links() if link.get_attr("IFLA_IFNAME") != "lo"]
    if interface:
        found = [link for link in links if link.get_attr("IFLA_IFNAME") == interface]
        if not found:
            raise NetnsError(f"network namespace {namespace} has no interface {interface!r}")
        return found[0]
    ours = [link for link in links if not link.get_attr("IFLA_IFNAME").startswith(TAP_NAME[:4])]
    if len(ours) != 1:
        names = ", ".join(link.get_attr("IFLA_IFNAME") for link in ours) or "none"
        raise NetnsError(f"network namespace {namespace} has {len(ours)} interfaces other than lo ({names}): "
                         "name one in network.interface")
    return ours[0]


RT_SCOPE_LINK = 253


def _default_gateway(ipr: Any, family: int, index: int) -> str:
    for route in ipr.get_routes(family=family, table=254):
        if route["dst_len"] == 0 and route.get_attr("RTA_GATEWAY") and route.get_attr("RTA_OIF") in (index, None):
            return route.get_attr("RTA_GATEWAY")
    return ""


def observe(namespace: str, interface: str | None = None) -> Observed:
    """The namespace's interface (its one other than lo unless named): name, MAC, its addresses
    with their prefixes (IPv4 and IPv6, not link-local: the guest's kernel makes its own), the
    default gateways (IPv4, IPv6), MTU."""
    with _ipr(namespace) as ipr:
        return _observe(ipr, namespace, interface)


def _observe(ipr: Any, namespace: str, interface: str | None) -> Observed:
    link = _interface(ipr, namespace, interface)
    index = link["index"]
    found = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for family in (2, 10)
             for a in ipr.get_addr(family=family, index=index) if a["scope"] != RT_SCOPE_LINK]
    v4 = [a for a in found if ":" not in a]
    address = v4[0] if v4 else ""
    return Observed(interface=link.get_attr("IFLA_IFNAME"), mac=link.get_attr("IFLA_ADDRESS"),
                    address=address, gateway=_default_gateway(ipr, 2, index), mtu=link.get_attr("IFLA_MTU"),
                    addresses=tuple(a for a in found if a != address), gateway6=_default_gateway(ipr, 10, index))


def _in_thread(work: Callable[[], Any]) -> Any:
    """`work()` run by a thread of its own (a namespace it enters or makes is that thread's only)."""
    result: dict[str, Any] = {}

    def thread() -> None:
        try:
            result["value"] = work()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=thread, name="microvmc-netns")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _setns(namespace: str) -> None:
    """The calling thread enters the namespace."""
    fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _libc_call("setns", fd, CLONE_NEWNET)
    finally:
        os.close(fd)


def _in_namespace(namespace: str, work: Callable[[], Any]) -> Any:
    """`work()` run by a thread that has entered the namespace (the rest of the process stays out)."""
    def entered() -> Any:
        _setns(namespace)
        return work()

    return _in_thread(entered)


def _open_tap() -> tuple[int, str]:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TAP_NAME.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd, struct.unpack("16sH", answer)[0].rstrip(b"\0").decode()


def _redirect(ipr: Any, source: int, target: int) -> None:
    """Every frame arriving on `source` leaves through `target` (tc: ingress qdisc, u32 match-all, mirred)."""
    ipr.tc("add", "ingress", source, "ffff:")
    ipr.tc("add-filter", "u32", source, ":1", parent="ffff:", prio=FILTER_PRIO, protocol=ETH_P_ALL, target=FILTER_MARK,
           keys=["0x0/0x0+0"], action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target})


def _has_ingress(ipr: Any, index: int) -> bool:
    return any(q["handle"] == INGRESS for q in ipr.get_qdiscs(index=index))


def _redirect_targets(ipr: Any, index: int) -> list[int] | None:
    """The devices the interface's ingress filters redirect to, when every filter is one of
    microvmc's (FILTER_PRIO, FILTER_MARK, a mirred redirect); None when any is not, or there is none."""
    targets = []
    for f in ipr.get_filters(index=index, parent=INGRESS):
        options = f.get_attr("TCA_OPTIONS")
        if f["info"] >> 16 != FILTER_PRIO or f.get_attr("TCA_KIND") != "u32":
            return None
        actions = options.get_attr("TCA_U32_ACT") if options else None
        if actions is None:
            continue  # the u32 hash table's own entries
        if options.get_attr("TCA_U32_CLASSID") != FILTER_MARK:
            return None
        for _, action in actions["attrs"]:
            parms = action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS") if action.get_attr("TCA_ACT_KIND") == "mirred" else None
            if parms is None:
                return None
            targets.append(parms["ifindex"])
    return targets or None


def _clear_stale_ingress(ipr: Any, namespace: str, name: str, index: int) -> None:
    """An ingress qdisc on the interface is refused, unless it is what a SIGKILLed run left: only
    microvmc's filters (their marker), redirecting to taps that are gone (a tap goes with QEMU's
    last descriptor). That one is removed."""
    if not _has_ingress(ipr, index):
        return
    where = f"the interface {name} of network namespace {namespace}"
    targets = _redirect_targets(ipr, index)
    if targets is None:
        raise NetnsError(f"{where} already has an ingress qdisc that is not microvmc's", hint="its owner must remove it")
    live = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link["index"] in targets
            and link.get_attr("IFLA_IFNAME").startswith(TAP_NAME[:4])]
    if live:
        raise NetnsError(f"{where} is already joined to another VM (its tap {live[0]})")
    _remove_ingress(ipr, index)


@contextmanager
def tap_joined(namespace: str, interface: str = "", mtu: int = 0) -> Iterator[int]:
    """A tap device made in the namespace and joined to its interface both ways; yields the tap's
    descriptor (QEMU's Fd.TAP). The tap has the guest's `mtu` (0: the interface's), which must not
    exceed the interface's: the veth would drop the guest's larger frames. On exit the interface's
    ingress qdisc (its filter with it) goes and the tap with the last descriptor of it (QEMU's has
    gone by then): the namespace is as it was."""
    from pyroute2.netlink.exceptions import NetlinkError

    with ExitStack() as stack:
        ipr = stack.enter_context(_ipr(namespace))
        link = _interface(ipr, namespace, interface or None)
        name, index = link.get_attr("IFLA_IFNAME"), link["index"]
        if mtu > link.get_attr("IFLA_MTU"):
            raise NetnsError(f"network.mtu: {mtu} is larger than the MTU {link.get_attr('IFLA_MTU')} of the interface "
                             f"{name} of network namespace {namespace}")
        _clear_stale_ingress(ipr, namespace, name, index)
        try:
            fd, tap = _in_namespace(namespace, _open_tap)
        except OSError as e:
            raise NetnsError(f"cannot make a tap device in network namespace {namespace}: {e.strerror or e}") from e
        stack.callback(_remove_tap, ipr, tap)
        stack.callback(os.close, fd)
        try:
            tap_index = ipr.link_lookup(ifname=tap)[0]
            ipr.link("set", index=tap_index, mtu=mtu or link.get_attr("IFLA_MTU"), state="up")
            stack.callback(_remove_ingress, ipr, index)
            _redirect(ipr, index, tap_index)
            _redirect(ipr, tap_index, index)
        except NetlinkError as e:
            raise NetnsError(f"cannot join a tap device to {name} in network namespace {namespace}: {e.args[-1]}") from e
        yield fd


def _remove_ingress(ipr: Any, index: int) -> None:
    """The interface's ingress qdisc and its filter; an interface that is gone (an engine's network
    teardown deleted the veth first) took them with it."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        if _has_ingress(ipr, index):
            ipr.tc("del", "ingress", index, "ffff:")
    except NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
            raise


def _remove_tap(ipr: Any, tap: str) -> None:
    """The tap goes with its last descriptor; should anything still hold one, it is deleted."""
    if found := ipr.link_lookup(ifname=tap):
        ipr.link("del", index=found[0])


def namespace_network(namespace: str, interface: str = "") -> tuple[Network | None, str]:
    """The manifest's `[network]` for a VM that takes over the namespace's interface (mode netns,
    its observed MAC, addresses, gateways and MTU), or None and why not: an interface without an IPv4
    address or without a default route (the guest init needs both) keeps the VM without a network,
    as does a namespace with only lo (an engine's `--network none`)."""
    with _ipr(namespace) as ipr:  # one netlink session in the namespace (pyroute2 forks a helper into it)
        if not interface and all(link.get_attr("IFLA_IFNAME") == "lo" for link in ipr.get_links()):
            return None, f"network namespace {namespace} has no interface other than lo"
        seen = _observe(ipr, namespace, interface or None)
    if not seen.address or not seen.gateway:
        missing = "IPv4 address" if not seen.address else "default route"
        return None, f"the interface {seen.interface} of network namespace {namespace} has no {missing}"
    return Network(mode=NetworkMode.NETNS, namespace=namespace, interface=seen.interface, address=seen.address,
                   addresses=seen.addresses, gateway=seen.gateway, gateway6=seen.gateway6, mac=seen.mac.lower(),
                   mtu=seen.mtu), ""


# --- a namespace of the runtime's own (docker: config.json asks for one without a path) -----------


def _libc_call(name: str, *args: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def new_namespace(path: str) -> None:
    """A new network namespace (only lo, down), kept by a bind mount of it on the file `path`, as
    `ip netns add` keeps one: it lives until remove_namespace(path), whoever is in it."""
    def make() -> None:
        _libc_call("unshare", CLONE_NEWNET)  # this thread only: the rest of the process stays out
        _libc_call("mount", f"/proc/self/task/{threading.get_native_id()}/ns/net".encode(), os.fsencode(path),
                   None, MS_BIND, None)

    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
        _in_thread(make)
    except OSError as e:
        remove_namespace(path)
        raise NetnsError(f"cannot make a network namespace at {path}: {e.strerror or e}") from e


def remove_namespace(path: str) -> None:
    """Undo new_namespace(path): the bind mount (lazily: a process may still have it open) and the
    file; the namespace itself ends with the last process in it. Nothing there is no error."""
    try:
        _libc_call("umount2", os.fsencode(path), MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted, not there
            raise NetnsError(f"cannot unmount the network namespace {path}: {e.strerror}") from e
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def same_namespace(a: str, b: str) -> bool:
    """Whether two paths (/proc/PID/ns/net, a bind mount of one) are the same namespace; a path
    that is not there is no namespace (observing it fails later, with its own message)."""
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def join(namespace: str) -> None:
    """Move the calling thread (in a single-threaded process: the process) into the namespace."""
    try:
        _setns(namespace)
    except OSError as e:
        raise NetnsError(f"cannot enter network namespace {namespace}: {e.strerror}") from e


@contextmanager
def holder(namespace: str) -> Iterator[int]:
    """A process that lives in the namespace while the context lasts; yields its pid, so that
    /proc/<pid>/ns/net is the namespace (what a container's hooks are told: docker's
    libnetwork-setkey moves the container's veth there). It ends when its pipe closes, so also
    when this process is killed."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    told, tell = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - seen through the tests' hooks
        status = 1
        try:
            os.close(write_end)
            os.close(told)
            join(namespace)
            os.write(tell, b"1")
            os.close(tell)
            os.read(read_end, 1)  # EOF: the parent is done with it (or gone)
            status = 0
        finally:
            os._exit(status)
    os.close(read_end)
    os.close(tell)
    try:
        with os.fdopen(told, "rb") as ready:
            if ready.read(1) != b"1":
                raise NetnsError(f"cannot enter network namespace {namespace}")
        yield pid
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
