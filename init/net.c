/* The network: lo is always up; with MVMC_NET, the VM's network device gets its static address and
 * a default route, and the guest its /etc/hosts and /etc/resolv.conf. ioctls only: no tools in the
 * image. Runs after the API filesystems (NET_FILES is under /dev) and before the shares and the
 * MVMC_M<n> mounts, which bind the files. */
#include "init.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
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

static void set_addr(struct sockaddr *sa, struct in_addr addr)
{
	struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr = addr};
	memcpy(sa, &in, sizeof in);
}

static void request(int s, unsigned long op, const char *opname, struct ifreq *ifr)
{
	if (ioctl(s, op, ifr) < 0)
		fail("network", errno, "%s %s", opname, ifr->ifr_name);
}

static void bring_up(int s, const char *name)
{
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	request(s, SIOCGIFFLAGS, "SIOCGIFFLAGS", &ifr);
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	step("network: %s up", name);
	request(s, SIOCSIFFLAGS, "SIOCSIFFLAGS", &ifr);
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

static struct in_addr parse_ip(const char *text, const char *what)
{
	struct in_addr addr;
	if (inet_pton(AF_INET, text, &addr) != 1)
		fail("config", 0, "MVMC_NET: %s %s is not an IPv4 address", what, text);
	return addr;
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0 || write_all(fd, text, strlen(text)) < 0 || close(fd) < 0)
		fail("network", errno, "write %s", path);
}

/* Name resolution without tools in the image and without modifying it: /etc/hosts and
 * /etc/resolv.conf are written into a tmpfs of their own at NET_FILES, which the compiler's
 * MVMC_M<n> ops bind onto /etc (on any root: read-only, overlay or read-write) and then detach. */
static void write_name_files(const char *address, const char *dns)
{
	if (mkdir(NET_FILES, 0755) < 0)
		fail("network", errno, "mkdir " NET_FILES);
	if (mount("tmpfs", NET_FILES, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k") < 0)
		fail("network", errno, "mount tmpfs on " NET_FILES);
	const char *name = cfg.hostname ? cfg.hostname : "localhost";
	size_t size = strlen(name) + strlen(dns) * 2 + 256;
	char *text = need(malloc(size));
	snprintf(text, size, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", address,
		 name);
	write_file(NET_FILES "/hosts", text);
	/* one nameserver line per server of the comma-separated list (none: an empty resolv.conf) */
	size_t used = 0;
	text[0] = '\0';
	for (const char *server = dns; *server;) {
		size_t n = strcspn(server, ",");
		used += snprintf(text + used, size - used, "nameserver %.*s\n", (int)n, server);
		server += n + (server[n] == ',');
	}
	write_file(NET_FILES "/resolv.conf", text);
	free(text);
}

/* MVMC_NET = address/prefix:gateway:dns[,dns...] (dns may be empty: no DNS server) */
void network_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail("network", errno, "socket");
	bring_up(s, "lo"); /* the kernel gives lo 127.0.0.1/8 when it comes up */
	if (!cfg.net) {
		close(s);
		return;
	}
	char *spec = need(strdup(cfg.net));
	char *address = spec, *gateway = strchr(spec, ':'), *dns = gateway ? strchr(gateway + 1, ':') : NULL;
	char *slash = strchr(spec, '/');
	if (!gateway || !dns || !slash || slash > gateway)
		fail("config", 0, "MVMC_NET=%s: expected address/prefix:gateway:dns", cfg.net);
	*slash = *gateway++ = *dns++ = '\0';
	int prefix = atoi(slash + 1);
	if (prefix < 1 || prefix > 32)
		fail("config", 0, "MVMC_NET=%s: bad prefix length", cfg.net);
	struct in_addr addr = parse_ip(address, "address"), gw = parse_ip(gateway, "gateway");
	for (char *server = dns, *end; *server; server = *end ? end + 1 : end) {
		end = server + strcspn(server, ",");
		char saved = *end;
		*end = '\0';
		parse_ip(server, "dns");
		*end = saved;
	}
	struct in_addr mask = {.s_addr = htonl(0xffffffffu << (32 - prefix))};

	char name[IFNAMSIZ];
	long deadline = uptime_ms() + DEVICE_DEADLINE_MS;
	while (!find_device(name)) {
		if (uptime_ms() > deadline)
			fail("network", 0, "no network device appeared within %d ms", DEVICE_DEADLINE_MS);
		sleep_ms(1);
	}
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	step("network: %s %s/%d via %s, dns %s", name, address, prefix, gateway, dns);
	set_addr(&ifr.ifr_addr, addr);
	request(s, SIOCSIFADDR, "SIOCSIFADDR", &ifr);
	set_addr(&ifr.ifr_netmask, mask);
	request(s, SIOCSIFNETMASK, "SIOCSIFNETMASK", &ifr);
	bring_up(s, name);
	struct rtentry route = {0};
	struct in_addr any = {.s_addr = INADDR_ANY};
	set_addr(&route.rt_dst, any);
	set_addr(&route.rt_genmask, any);
	set_addr(&route.rt_gateway, gw);
	route.rt_flags = RTF_UP | RTF_GATEWAY;
	route.rt_dev = name;
	if (ioctl(s, SIOCADDRT, &route) < 0)
		fail("network", errno, "default route via %s", gateway);
	close(s);
	write_name_files(address, dns);
	free(spec);
}
