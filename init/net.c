/* The network: lo is always up; with MVMC_NET, the VM's network device gets its static addresses
 * (IPv4 and IPv6) and default routes, and the guest its /etc/hosts and /etc/resolv.conf. rtnetlink
 * and ioctls only: no tools in the image. Runs after the API filesystems (NET_FILES is under /dev,
 * the IPv6 switches under /proc) and before the shares and the MVMC_M<n> mounts, which bind the files. */
#include "init.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_addr.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEVICE_DEADLINE_MS 5000
#define NET_FILES "/dev/.microvmc-net" /* compiler/graph.py: NET_FILES */
#define MAX_ADDRS 16

struct ipaddr {
	int family; /* AF_INET or AF_INET6 */
	unsigned char bytes[16];
	int prefix; /* -1 for an address without one (a gateway, a DNS server) */
	char text[INET6_ADDRSTRLEN];
};

static size_t addr_len(const struct ipaddr *a)
{
	return a->family == AF_INET ? 4 : 16;
}

static void bring_up(int s, const char *name)
{
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		fail("network", errno, "SIOCGIFFLAGS %s", name);
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	step("network: %s up", name);
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		fail("network", errno, "SIOCSIFFLAGS %s", name);
}

/* The VM's one network device: the first interface that is not lo (virtio_net's eth0). */
static int find_device(char name[IFNAMSIZ])
{
	struct if_nameindex *all = if_nameindex();
	int found = 0;
	for (struct if_nameindex *i = all; all && i->if_index; i++)
		if (strcmp(i->if_name, "lo") != 0) {
			snprintf(name, IFNAMSIZ, "%s", i->if_name);
			found = 1;
			break;
		}
	if (all)
		if_freenameindex(all);
	return found;
}

/* "192.0.2.5", "fd00::5", with "/prefix" when `with_prefix` */
static struct ipaddr parse_ip(const char *text, int with_prefix, const char *what)
{
	struct ipaddr a = {.prefix = -1};
	char *copy = need(strdup(text)), *slash = strchr(copy, '/');
	if (with_prefix != (slash != NULL))
		fail("config", 0, "MVMC_NET: %s %s: %s", what, text, with_prefix ? "no prefix length" : "a prefix length");
	if (slash)
		*slash = '\0';
	if (inet_pton(AF_INET, copy, a.bytes) == 1)
		a.family = AF_INET;
	else if (inet_pton(AF_INET6, copy, a.bytes) == 1)
		a.family = AF_INET6;
	else
		fail("config", 0, "MVMC_NET: %s %s is not an IP address", what, text);
	if (slash) {
		char *end;
		long prefix = strtol(slash + 1, &end, 10);
		if (*end || end == slash + 1 || prefix < 1 || prefix > (long)addr_len(&a) * 8)
			fail("config", 0, "MVMC_NET: %s %s: bad prefix length", what, text);
		a.prefix = (int)prefix;
	}
	snprintf(a.text, sizeof a.text, "%s", copy);
	free(copy);
	return a;
}

/* A comma-separated list of addresses into out[]; returns how many. */
static size_t parse_list(const char *list, int with_prefix, const char *what, struct ipaddr *out)
{
	size_t n = 0;
	char *copy = need(strdup(list));
	for (char *item = strtok(copy, ","); item; item = strtok(NULL, ",")) {
		if (n == MAX_ADDRS)
			fail("config", 0, "MVMC_NET: more than %d %ss", MAX_ADDRS, what);
		out[n++] = parse_ip(item, with_prefix, what);
	}
	free(copy);
	return n;
}

/* ---------------------------------------------------------------- rtnetlink */

struct request {
	struct nlmsghdr nh;
	union {
		struct ifaddrmsg ifa;
		struct rtmsg rt;
	} body;
	char attrs[128];
};

static void add_attr(struct request *r, unsigned short type, const void *data, size_t len)
{
	size_t at = NLMSG_ALIGN(r->nh.nlmsg_len);
	if (at + RTA_SPACE(len) > sizeof *r)
		fail("network", E2BIG, "netlink request");
	struct rtattr *rta = (struct rtattr *)((char *)r + at);
	rta->rta_type = type;
	rta->rta_len = RTA_LENGTH(len);
	memcpy(RTA_DATA(rta), data, len);
	r->nh.nlmsg_len = at + RTA_ALIGN(rta->rta_len);
}

/* Send the request and wait for the kernel's answer: 0 or an errno. */
static int talk(int nl, struct request *r)
{
	static unsigned seq;
	r->nh.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	r->nh.nlmsg_seq = ++seq;
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
	if (sendto(nl, r, r->nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
		return errno;
	for (;;) {
		char buf[4096];
		ssize_t got = recv(nl, buf, sizeof buf, 0);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return errno;
		int len = (int)got;
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len))
			if (h->nlmsg_seq == seq && h->nlmsg_type == NLMSG_ERROR)
				return -((struct nlmsgerr *)NLMSG_DATA(h))->error;
	}
}

/* IPv6 without duplicate address detection: the engine's interface, whose addresses these are,
 * did it (and no longer answers: the VM took its traffic over), so they are usable at once. */
static void add_address(int nl, int index, const struct ipaddr *a)
{
	struct request r = {.nh = {.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifaddrmsg)), .nlmsg_type = RTM_NEWADDR,
				   .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL}};
	r.body.ifa = (struct ifaddrmsg){.ifa_family = a->family, .ifa_prefixlen = a->prefix,
					.ifa_flags = a->family == AF_INET6 ? IFA_F_NODAD : 0, .ifa_index = index};
	add_attr(&r, IFA_LOCAL, a->bytes, addr_len(a));
	add_attr(&r, IFA_ADDRESS, a->bytes, addr_len(a));
	if (a->family == AF_INET && a->prefix < 31) { /* as SIOCSIFNETMASK did: the network's broadcast */
		struct in_addr brd;
		memcpy(&brd, a->bytes, 4);
		brd.s_addr |= htonl(0xffffffffu >> a->prefix);
		add_attr(&r, IFA_BROADCAST, &brd, 4);
	}
	int err = talk(nl, &r);
	if (err)
		fail("network", err, "address %s/%d", a->text, a->prefix);
}

static void add_default_route(int nl, int index, const struct ipaddr *gw)
{
	struct request r = {.nh = {.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg)), .nlmsg_type = RTM_NEWROUTE,
				   .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL}};
	r.body.rt = (struct rtmsg){.rtm_family = gw->family, .rtm_table = RT_TABLE_MAIN, .rtm_protocol = RTPROT_BOOT,
				   .rtm_scope = RT_SCOPE_UNIVERSE, .rtm_type = RTN_UNICAST};
	add_attr(&r, RTA_GATEWAY, gw->bytes, addr_len(gw));
	add_attr(&r, RTA_OIF, &index, sizeof index);
	int err = talk(nl, &r);
	if (err)
		fail("network", err, "default route via %s", gw->text);
}

/* The guest's configuration is exactly what the host states: no router advertisements, no SLAAC
 * (slirp and some engines send RAs). A kernel without IPv6 has no such files. */
static void no_autoconf(const char *name)
{
	static const char *const knobs[] = {"accept_ra", "autoconf"};
	for (size_t i = 0; i < sizeof knobs / sizeof *knobs; i++) {
		char path[96];
		snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/%s", name, knobs[i]);
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		if (write_all(fd, "0", 1) < 0)
			fail("network", errno, "write %s", path);
		close(fd);
	}
}

/* ---------------------------------------------------------------- name resolution */

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0 || write_all(fd, text, strlen(text)) < 0 || close(fd) < 0)
		fail("network", errno, "write %s", path);
}

/* Name resolution without tools in the image and without modifying it: /etc/hosts and
 * /etc/resolv.conf are written into a tmpfs of their own at NET_FILES, which the compiler's
 * MVMC_M<n> ops bind onto /etc (on any root: read-only, overlay or read-write) and then detach. */
static void write_name_files(const struct ipaddr *addrs, size_t naddrs, const struct ipaddr *dns, size_t ndns)
{
	if (mkdir(NET_FILES, 0755) < 0)
		fail("network", errno, "mkdir " NET_FILES);
	if (mount("tmpfs", NET_FILES, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k") < 0)
		fail("network", errno, "mount tmpfs on " NET_FILES);
	const char *name = cfg.hostname ? cfg.hostname : "localhost";
	size_t size = 128 + (naddrs + ndns) * (INET6_ADDRSTRLEN + strlen(name) + 16);
	char *text = need(malloc(size));
	size_t used = (size_t)snprintf(text, size, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
	for (size_t i = 0; i < naddrs; i++) /* the hostname on each of the guest's addresses */
		used += (size_t)snprintf(text + used, size - used, "%s\t%s\n", addrs[i].text, name);
	write_file(NET_FILES "/hosts", text);
	used = 0;
	text[0] = '\0';
	for (size_t i = 0; i < ndns; i++) /* none: an empty resolv.conf */
		used += (size_t)snprintf(text + used, size - used, "nameserver %s\n", dns[i].text);
	write_file(NET_FILES "/resolv.conf", text);
	free(text);
}

/* MVMC_NET = addresses:gateways:dns, each a comma-separated list (init/PROTOCOL.md), its fields
 * still encoded: the raw ':'s separate them, an IPv6 address's are %3A. */
void network_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail("network", errno, "socket");
	bring_up(s, "lo"); /* the kernel gives lo 127.0.0.1/8 (and ::1) when it comes up */
	if (!cfg.net) {
		close(s);
		return;
	}
	char *fields[3] = {cfg.net, NULL, NULL};
	for (int i = 1; i < 3; i++) {
		char *colon = strchr(fields[i - 1], ':');
		if (!colon)
			fail("config", 0, "MVMC_NET=%s: expected addresses:gateways:dns", cfg.net);
		*colon = '\0';
		fields[i] = colon + 1;
	}
	if (strchr(fields[2], ':'))
		fail("config", 0, "MVMC_NET: expected addresses:gateways:dns");
	char *text[3];
	for (int i = 0; i < 3; i++)
		text[i] = decode(fields[i], strlen(fields[i]), "MVMC_NET");
	struct ipaddr addrs[MAX_ADDRS], gws[MAX_ADDRS], dns[MAX_ADDRS];
	size_t naddrs = parse_list(text[0], 1, "address", addrs), ngws = parse_list(text[1], 0, "gateway", gws),
	       ndns = parse_list(text[2], 0, "dns server", dns);
	if (!naddrs)
		fail("config", 0, "MVMC_NET: no address");

	char name[IFNAMSIZ];
	long deadline = uptime_ms() + DEVICE_DEADLINE_MS;
	while (!find_device(name)) {
		if (uptime_ms() > deadline)
			fail("network", 0, "no network device appeared within %d ms", DEVICE_DEADLINE_MS);
		sleep_ms(1);
	}
	int index = (int)if_nametoindex(name);
	int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (nl < 0 || index == 0)
		fail("network", errno, "netlink socket");
	step("network: %s %s, via %s, dns %s", name, text[0], text[1], text[2]);
	no_autoconf(name); /* before it is up: no router solicitation either */
	bring_up(s, name);
	for (size_t i = 0; i < naddrs; i++)
		add_address(nl, index, &addrs[i]);
	for (size_t i = 0; i < ngws; i++)
		add_default_route(nl, index, &gws[i]);
	close(nl);
	close(s);
	write_name_files(addrs, naddrs, dns, ndns);
	for (int i = 0; i < 3; i++)
		free(text[i]);
}
