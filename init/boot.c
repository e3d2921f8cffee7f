/* Boot: the early mounts, the kernel modules, the ports, the root filesystem and the shares. */
#include "init.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PORT_DEADLINE_MS 10000
#define NEWROOT "/newroot"
#define OVERLAY_LOWER "/mnt/lower"
#define OVERLAY_RW "/mnt/rw"
/* loose caching is fastest but does not see host changes: fine for what the guest cannot write */
#define P9_OPTS_RO "trans=virtio,version=9p2000.L,msize=512000,cache=loose"
#define P9_OPTS_RW "trans=virtio,version=9p2000.L,msize=512000,cache=mmap"

/* status comes first: once it is open, every later failure can be reported there */
const char *const port_names[NPORTS] = {"status", "stdin", "stdout", "stderr", "control", "channel"};
int ports[NPORTS] = {[0 ... NPORTS - 1] = -1};

static void make_dir(const char *stage, const char *path)
{
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		fail(stage, errno, "mkdir %s", path);
}

/* mkdir -p; a directory that exists is fine even on a read-only filesystem (EEXIST wins).
 * A failure names the whole path asked for, not only the component that failed. */
static void make_dirs(const char *stage, const char *path)
{
	char *copy = need(strdup(path));
	for (char *p = copy + 1;; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char end = *p;
		*p = '\0';
		if (mkdir(copy, 0755) < 0 && errno != EEXIST)
			fail(stage, errno, "cannot make mount point %s: mkdir %s", path, copy);
		*p = end;
		if (end == '\0')
			break;
	}
	free(copy);
}

static void mount_at(const char *src, const char *target, const char *type, unsigned long flags,
		     const char *data)
{
	step("mount %s (%s) on %s", src, type, target);
	if (mount(src, target, type, flags, data) < 0)
		fail("mount", errno, "mount %s (%s) on %s", src, type, target);
}

void mount_early(void)
{
	make_dir("mount", "/dev");
	mount_at("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (fd >= 0)
		console = fd;
	/* fds 0-2 must be taken, or a port could land there and be clobbered by dup2 in the child */
	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
		;
	if (fd > 2)
		close(fd);
	make_dir("mount", "/proc");
	mount_at("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	make_dir("mount", "/sys");
	mount_at("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

/* A module failure is reported once the status port is open (or the ports wait gives up). */
static char *module_failed;
static int module_errno;

void check_modules(void)
{
	if (module_failed)
		fail("module", module_errno, "load %s", module_failed);
}

static int load_module(const char *path)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	if (fstat(fd, &st) < 0) {
		close(fd);
		return -1;
	}
	void *image = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (image == MAP_FAILED)
		return -1;
	long rc = syscall(SYS_init_module, image, (unsigned long)st.st_size, "");
	int err = errno;
	munmap(image, st.st_size);
	if (rc < 0 && err != EEXIST) {
		errno = err;
		return -1;
	}
	unlink(path); /* the initramfs lives in RAM: give the memory back */
	return 0;
}

void load_modules(void)
{
	char *list = read_file("/microvmc/modules");
	if (!list) {
		/* no list: everything needed is built into the kernel */
		if (errno != ENOENT) {
			module_errno = errno;
			module_failed = "/microvmc/modules";
		}
		return;
	}
	for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
		step("load module %s", line);
		if (load_module(line) < 0 && !module_failed) {
			module_errno = errno;
			module_failed = line;
		}
	}
}

/* Finds "/dev/vportNpM" of every named port; names arrive after the device, so poll. */
static void scan_ports(char devs[NPORTS][64])
{
	DIR *dir = opendir("/sys/class/virtio-ports");
	struct dirent *de;
	if (!dir)
		return;
	while ((de = readdir(dir))) {
		char path[300], name[64];
		if (strncmp(de->d_name, "vport", 5) != 0)
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, name, sizeof name - 1);
		close(fd);
		if (n <= 0)
			continue;
		name[n] = '\0';
		name[strcspn(name, "\n")] = '\0';
		for (int i = 0; i < NPORTS; i++)
			if (strcmp(name, port_names[i]) == 0)
				snprintf(devs[i], sizeof devs[i], "/dev/%.50s", de->d_name);
	}
	closedir(dir);
}

void open_ports(void)
{
	char devs[NPORTS][64] = {{0}};
	long deadline = uptime_ms() + PORT_DEADLINE_MS;
	for (int missing = NPORTS; missing > 0;) {
		scan_ports(devs);
		missing = 0;
		for (int i = 0; i < NPORTS; i++) {
			if (ports[i] >= 0)
				continue;
			int flags = (i == PORT_STDIN || i == PORT_CONTROL ? O_RDONLY : i == PORT_CHANNEL ? O_RDWR : O_WRONLY) |
				    O_NOCTTY | O_CLOEXEC | (i == PORT_STATUS ? 0 : O_NONBLOCK);
			if (devs[i][0] && (ports[i] = open(devs[i], flags)) >= 0) {
				step("port %s is %s", port_names[i], devs[i]);
				continue;
			}
			/* the device node may lag its sysfs entry: only ENOENT is worth waiting for */
			if (devs[i][0] && errno != ENOENT)
				fail("ports", errno, "open %s (port %s)", devs[i], port_names[i]);
			missing++;
		}
		if (missing && uptime_ms() > deadline) {
			check_modules();
			for (int i = 0; i < NPORTS; i++)
				if (ports[i] < 0)
					fail("ports", 0, "port %s did not appear within %d ms",
					     port_names[i], PORT_DEADLINE_MS);
		}
		if (missing)
			sleep_ms(1);
	}
}

static void mount_share(const struct fsspec *spec, const char *target, int readonly)
{
	int p9 = strcmp(spec->fs, "9p") == 0;
	mount_at(spec->tag, target, spec->fs, readonly ? MS_RDONLY : 0,
		 p9 ? (readonly ? P9_OPTS_RO : P9_OPTS_RW) : NULL);
}

void mount_root(void)
{
	make_dir("mount", NEWROOT);
	if (strncmp(cfg.root.mode, "overlay", 7) != 0) {
		mount_share(&cfg.root, NEWROOT, strcmp(cfg.root.mode, "ro") == 0);
		return;
	}
	/* overlay: the shared root stays read-only; writes land in a tmpfs and vanish with the VM
	 * (overlay-ro: only the share mount points do, then the root is made read-only) */
	make_dirs("mount", OVERLAY_LOWER);
	make_dir("mount", OVERLAY_RW);
	mount_share(&cfg.root, OVERLAY_LOWER, 1);
	mount_at("tmpfs", OVERLAY_RW, "tmpfs", 0, "mode=0755");
	make_dir("mount", OVERLAY_RW "/upper");
	make_dir("mount", OVERLAY_RW "/work");
	mount_at("overlay", NEWROOT, "overlay", 0,
		 "lowerdir=" OVERLAY_LOWER ",upperdir=" OVERLAY_RW "/upper,workdir=" OVERLAY_RW "/work");
}

/* The initramfs is rootfs, which cannot be pivot_root'ed away: move the new root over it. */
void switch_root(void)
{
	static const char *const early[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < sizeof early / sizeof *early; i++)
		umount2(early[i], MNT_DETACH); /* remounted inside the new root below */
	step("switch root to " NEWROOT);
	if (chdir(NEWROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		fail("mount", errno, "switch root to " NEWROOT);
}

/* Mounted after the switch so that symlinks in the new root resolve inside it. */
void mount_api_filesystems(void)
{
	static const struct {
		const char *type, *target, *data;
		unsigned long flags;
		int required;
	} fss[] = {
		{"proc", "/proc", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC, 1},
		{"sysfs", "/sys", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC, 1},
		{"devtmpfs", "/dev", "mode=0755", MS_NOSUID, 1},
		{"devpts", "/dev/pts", "gid=5,mode=0620,ptmxmode=0666", MS_NOSUID | MS_NOEXEC, 0},
		{"tmpfs", "/dev/shm", "mode=1777", MS_NOSUID | MS_NODEV, 0},
		{"tmpfs", "/tmp", "mode=1777", MS_NOSUID | MS_NODEV, 0},
		{"tmpfs", "/run", "mode=0755", MS_NOSUID | MS_NODEV, 0},
	};
	for (size_t i = 0; i < sizeof fss / sizeof *fss; i++) {
		if (mkdir(fss[i].target, 0755) < 0 && errno != EEXIST) {
			if (fss[i].required)
				fail("mount", errno, "mkdir %s", fss[i].target);
			step("skip %s: cannot create it", fss[i].target);
			continue;
		}
		mount_at(fss[i].type, fss[i].target, fss[i].type, fss[i].flags, fss[i].data);
	}
}

/* Where `path` leads inside the root: each symbolic link on the way followed (an absolute target from
 * the root we are chrooted in), and the part that does not exist yet kept as written. A bind onto
 * an image's /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf (dangling) lands there,
 * as runc does it, and the image's link stays. malloc'd. */
static char *resolve_in_root(const char *path)
{
	char resolved[PATH_MAX] = "", pending[PATH_MAX], target[PATH_MAX];
	if (snprintf(pending, sizeof pending, "%s", path) >= (int)sizeof pending)
		fail("mount", ENAMETOOLONG, "bind target %s", path);
	for (int hops = 0; pending[0];) {
		char *part = pending + strspn(pending, "/"), *rest = part + strcspn(part, "/");
		size_t len = (size_t)(rest - part), used = strlen(resolved);
		if (len == 0 || (len == 1 && part[0] == '.')) {
			memmove(pending, rest, strlen(rest) + 1);
			continue;
		}
		if (len == 2 && part[0] == '.' && part[1] == '.') {
			*(strrchr(resolved, '/') ? strrchr(resolved, '/') : resolved) = '\0';
			memmove(pending, rest, strlen(rest) + 1);
			continue;
		}
		if (used + 1 + len >= sizeof resolved)
			fail("mount", ENAMETOOLONG, "bind target %s", path);
		resolved[used] = '/';
		memcpy(resolved + used + 1, part, len);
		resolved[used + 1 + len] = '\0';
		ssize_t n = readlink(resolved, target, sizeof target - 1);
		if (n < 0) { /* not a link (or not there yet): a directory or the missing rest */
			memmove(pending, rest, strlen(rest) + 1);
			continue;
		}
		if (++hops > 40)
			fail("mount", ELOOP, "bind target %s", path);
		target[n] = '\0';
		resolved[target[0] == '/' ? 0 : used] = '\0'; /* an absolute target starts again at the root */
		if ((size_t)n + strlen(rest) >= sizeof pending)
			fail("mount", ENAMETOOLONG, "bind target %s", path);
		memmove(pending + n, rest, strlen(rest) + 1);
		memcpy(pending, target, (size_t)n);
	}
	return need(strdup(resolved[0] ? resolved : "/"));
}

/* A bind mount's target: a directory for a directory, an (empty) file for anything else. */
static void make_target(const char *source, const char *target)
{
	struct stat st;
	if (stat(source, &st) < 0)
		fail("mount", errno, "bind %s: stat", source);
	if (S_ISDIR(st.st_mode)) {
		make_dirs("mount", target);
		return;
	}
	char *parent = need(strdup(target));
	*strrchr(parent, '/') = '\0';
	if (*parent)
		make_dirs("mount", parent);
	free(parent);
	int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644);
	if (fd < 0 && errno != EISDIR && errno != EROFS && errno != EEXIST)
		fail("mount", errno, "cannot make mount point %s", target);
	if (fd >= 0)
		close(fd);
}

/* MVMC_M<n>, after the shares they bind from (the OCI runtime's single files and tmpfs mounts). */
static void mount_ops(void)
{
	for (size_t i = 0; i < cfg.nops; i++) {
		const struct mountop *op = &cfg.ops[i];
		switch (op->kind) {
		case OP_BIND: {
			char *target = resolve_in_root(op->b);
			if (strcmp(target, op->b) != 0)
				step("bind %s: %s leads to %s", op->a, op->b, target);
			make_target(op->a, target);
			mount_at(op->a, target, "bind", MS_BIND, NULL);
			if (op->readonly && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
				fail("mount", errno, "remount %s read-only", target);
			free(target);
			break;
		}
		case OP_TMPFS:
			make_dirs("mount", op->a);
			mount_at("tmpfs", op->a, "tmpfs", MS_NOSUID | MS_NODEV | (op->readonly ? MS_RDONLY : 0),
				 op->b);
			break;
		case OP_DETACH:
			step("detach %s", op->a);
			if (umount2(op->a, MNT_DETACH) < 0 || rmdir(op->a) < 0)
				fail("mount", errno, "detach %s", op->a);
			break;
		}
	}
}

/* After the API filesystems, so that a share under /tmp or /run is not hidden by a tmpfs. */
void mount_shares(void)
{
	for (size_t i = 0; i < cfg.nshares; i++) {
		make_dirs("mount", cfg.shares[i].path);
		mount_share(&cfg.shares[i], cfg.shares[i].path, strcmp(cfg.shares[i].mode, "ro") == 0);
	}
	mount_ops();
	/* overlay-ro: the mount points a read-only image lacked are made; now the root is read-only */
	if (strcmp(cfg.root.mode, "overlay-ro") == 0) {
		step("remount / read-only");
		if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
			fail("mount", errno, "remount / read-only");
	}
}

