/*
 * microvmc guest init: PID 1 of the initramfs.
 *
 * Mounts the kernel filesystems, loads the modules listed in /microvmc/modules, opens the
 * virtio-serial ports, mounts the root described by MVMC_ROOT, switches into it, mounts the
 * shares, runs one program on the ports and reports its fate on the status port, then reboots
 * (which, with reboot=t and QEMU's -no-reboot, ends the VM). PROTOCOL.md is the contract.
 *
 * Built by microvmc with: gcc -static -Os -s -Wall -Wextra -Werror -o init init.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <poll.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_DEADLINE_MS 10000
#define REAP_DEADLINE_MS 1000
#define NEWROOT "/newroot"
#define OVERLAY_LOWER "/mnt/lower"
#define OVERLAY_RW "/mnt/rw"
/* loose caching is fastest but does not see host changes: fine for what the guest cannot write */
#define P9_OPTS_RO "trans=virtio,version=9p2000.L,msize=512000,cache=loose"
#define P9_OPTS_RW "trans=virtio,version=9p2000.L,msize=512000,cache=mmap"

enum port { PORT_STATUS, PORT_STDIN, PORT_STDOUT, PORT_STDERR, PORT_CONTROL, NPORTS };
/* status comes first: once it is open, every later failure can be reported there */
static const char *const port_names[NPORTS] = {"status", "stdin", "stdout", "stderr", "control"};

static int ports[NPORTS] = {[0 ... NPORTS - 1] = -1};
static int console = 2; /* the kernel's /dev/console until we open our own */
static int debug;

/* ---------------------------------------------------------------- reporting */

static long uptime_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= n;
	}
	return 0;
}

/* Formats one report line: truncated to fit, line breaks in values replaced, '\n' appended. */
static size_t format_line(char *buf, size_t size, const char *fmt, va_list ap)
{
	int n = vsnprintf(buf, size - 1, fmt, ap);
	size_t len = n < 0 ? 0 : (size_t)n < size - 1 ? (size_t)n : size - 2;
	for (size_t i = 0; i < len; i++)
		if (buf[i] == '\n' || buf[i] == '\r')
			buf[i] = '?';
	buf[len++] = '\n';
	return len;
}

static void __attribute__((format(printf, 1, 2))) step(const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	if (!debug)
		return;
	int n = snprintf(line, sizeof line, "microvmc-init [%ld ms]: ", uptime_ms());
	va_start(ap, fmt);
	size_t len = format_line(line + n, sizeof line - n, fmt, ap);
	va_end(ap);
	write_all(console, line, n + len);
}

static void vreport(const char *fmt, va_list ap)
{
	char line[1024];
	size_t len = format_line(line, sizeof line, fmt, ap);
	int sent = ports[PORT_STATUS] >= 0 && write_all(ports[PORT_STATUS], line, len) == 0;
	if (!sent || debug)
		write_all(console, line, len);
}

static void __attribute__((format(printf, 1, 2))) report(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport(fmt, ap);
	va_end(ap);
}

/* Kills whatever is left, waits a little for it to go, so that sync() sees all writes. */
static void kill_and_reap_all(void)
{
	long deadline = uptime_ms() + REAP_DEADLINE_MS;
	kill(-1, SIGKILL);
	while (waitpid(-1, NULL, WNOHANG) >= 0 || errno != ECHILD) {
		if (uptime_ms() > deadline)
			break;
		usleep(1000);
	}
}

/* The last line of the VM: the report is written after sync() so the host sees shares settled. */
static void __attribute__((noreturn, format(printf, 1, 2))) finish(const char *fmt, ...)
{
	va_list ap;
	kill_and_reap_all();
	sync();
	va_start(ap, fmt);
	vreport(fmt, ap);
	va_end(ap);
	reboot(RB_AUTOBOOT);
	for (;;) /* unreachable in practice; PID 1 must never return */
		pause();
}

static void __attribute__((noreturn, format(printf, 3, 4)))
fail(const char *stage, int err, const char *fmt, ...)
{
	char message[768];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(message, sizeof message, fmt, ap);
	va_end(ap);
	if (err)
		finish("error %s %d %s: %s", stage, err, message, strerror(err));
	finish("error %s 0 %s", stage, message);
}

/* ---------------------------------------------------------------- small helpers */

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Reads a whole file into a NUL-terminated heap buffer; NULL with errno set on failure. */
static char *read_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t len = 0, cap = 4096;
	char *buf = malloc(cap);
	if (fd < 0 || !buf)
		goto fail;
	for (;;) {
		if (len + 1 >= cap) {
			char *bigger = realloc(buf, cap *= 2);
			if (!bigger)
				goto fail;
			buf = bigger;
		}
		ssize_t n = read(fd, buf + len, cap - len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			goto fail;
		if (n == 0)
			break;
		len += n;
	}
	close(fd);
	buf[len] = '\0';
	return buf;
fail:;
	int err = errno;
	if (fd >= 0)
		close(fd);
	free(buf);
	errno = err;
	return NULL;
}

static void *need(void *p)
{
	if (!p)
		fail("config", ENOMEM, "out of memory");
	return p;
}

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

/* ---------------------------------------------------------------- early boot */

static void mount_early(void)
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

static void check_modules(void)
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

static void load_modules(void)
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

static void open_ports(void)
{
	char devs[NPORTS][64] = {{0}};
	long deadline = uptime_ms() + PORT_DEADLINE_MS;
	for (int missing = NPORTS; missing > 0;) {
		scan_ports(devs);
		missing = 0;
		for (int i = 0; i < NPORTS; i++) {
			if (ports[i] >= 0)
				continue;
			int flags = (i == PORT_STDIN || i == PORT_CONTROL ? O_RDONLY : O_WRONLY) | O_NOCTTY | O_CLOEXEC;
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

/* ---------------------------------------------------------------- configuration */

struct param {
	char *name;
	char *value; /* still percent-encoded */
};
static struct param *params;
static size_t nparams;

static void set_param(const char *entry)
{
	const char *eq = strchr(entry, '=');
	size_t namelen = eq - entry;
	for (size_t i = 0; i < nparams; i++)
		if (strlen(params[i].name) == namelen && !strncmp(params[i].name, entry, namelen)) {
			params[i].value = (char *)eq + 1;
			return;
		}
	params = need(realloc(params, (nparams + 1) * sizeof *params));
	params[nparams].name = need(strndup(entry, namelen));
	params[nparams++].value = (char *)eq + 1;
}

static const char *get_param(const char *name)
{
	for (size_t i = 0; i < nparams; i++)
		if (strcmp(params[i].name, name) == 0)
			return params[i].value;
	return NULL;
}

static const char *get_indexed(const char *prefix, size_t n)
{
	char name[32];
	snprintf(name, sizeof name, "%s%zu", prefix, n);
	return get_param(name);
}

static int hex(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Decodes len bytes of a %XX-encoded value; what names it for the error message. */
static char *decode(const char *s, size_t len, const char *what)
{
	char *out = need(malloc(len + 1)), *o = out;
	for (size_t i = 0; i < len; i++) {
		int hi, lo;
		if (s[i] == '%' && i + 2 < len && (hi = hex(s[i + 1])) >= 0 &&
		    (lo = hex(s[i + 2])) >= 0) {
			*o = (char)(hi << 4 | lo);
			i += 2;
		} else {
			*o = s[i];
		}
		if (*o++ == '\0')
			fail("config", 0, "%s contains a NUL byte", what);
	}
	*o = '\0';
	return out;
}

struct fsspec {
	char *fs, *tag, *mode, *path;
};

/* Splits "fs:tag:mode[:path]" at its raw ':' separators, then decodes each field. */
static void parse_fsspec(const char *name, const char *raw, int nfields, struct fsspec *spec)
{
	char **fields[] = {&spec->fs, &spec->tag, &spec->mode, &spec->path};
	for (int i = 0; i < nfields; i++) {
		const char *end = i == nfields - 1 ? raw + strlen(raw) : strchr(raw, ':');
		if (!end)
			fail("config", 0, "%s=%s: expected %d fields separated by ':'", name,
			     raw, nfields);
		*fields[i] = decode(raw, end - raw, name);
		raw = end + 1;
	}
	if (strcmp(spec->fs, "virtiofs") != 0 && strcmp(spec->fs, "9p") != 0)
		fail("config", 0, "%s: unknown filesystem %s", name, spec->fs);
	if (strcmp(spec->mode, "ro") != 0 && strcmp(spec->mode, "rw") != 0 &&
	    (nfields == 4 ||
	     (strcmp(spec->mode, "overlay") != 0 && strcmp(spec->mode, "overlay-ro") != 0)))
		fail("config", 0, "%s: unknown mode %s", name, spec->mode);
	if (nfields == 4 && spec->path[0] != '/')
		fail("config", 0, "%s: guest path %s is not absolute", name, spec->path);
}

static struct {
	char **argv, **envp;
	char *cwd, *hostname;
	struct fsspec root, *shares;
	size_t nshares;
} cfg;

/* Decodes a contiguous MVMC_<prefix>0, 1, ... list into a NULL-terminated array. */
static char **decode_list(const char *prefix, size_t *count)
{
	size_t n = 0;
	while (get_indexed(prefix, n))
		n++;
	char **list = need(calloc(n + 1, sizeof *list));
	for (size_t i = 0; i < n; i++) {
		const char *raw = get_indexed(prefix, i);
		if (strcmp(prefix, "MVMC_E") == 0) {
			/* enc(name)=enc(value): split at the raw '=' before decoding */
			const char *eq = strchr(raw, '=');
			if (!eq)
				fail("config", 0, "%s%zu=%s has no '='", prefix, i, raw);
			char *name = decode(raw, eq - raw, prefix), *value = decode(eq + 1, strlen(eq + 1), prefix);
			if (asprintf(&list[i], "%s=%s", name, value) < 0)
				need(NULL);
			free(name);
			free(value);
		} else {
			list[i] = decode(raw, strlen(raw), prefix);
		}
	}
	if (count)
		*count = n;
	return list;
}

static void read_config(void)
{
	extern char **environ;
	for (char **e = environ; *e; e++)
		if (strncmp(*e, "MVMC_", 5) == 0 && strchr(*e, '='))
			set_param(*e);
	if (getenv("MVMC_SPILL") && strcmp(getenv("MVMC_SPILL"), "1") == 0) {
		step("read /microvmc/config");
		char *spill = read_file("/microvmc/config");
		if (!spill)
			fail("config", errno, "read /microvmc/config");
		for (char *line = strtok(spill, "\n"); line; line = strtok(NULL, "\n")) {
			if (!strchr(line, '='))
				fail("config", 0, "/microvmc/config: line without '=': %s", line);
			set_param(line);
		}
	}

	size_t argc, nshares;
	cfg.argv = decode_list("MVMC_A", &argc);
	if (argc == 0)
		fail("config", 0, "no program: MVMC_A0 is missing");
	cfg.envp = decode_list("MVMC_E", NULL);
	const char *raw = get_param("MVMC_CWD");
	cfg.cwd = raw ? decode(raw, strlen(raw), "MVMC_CWD") : "/";
	raw = get_param("MVMC_HOSTNAME");
	cfg.hostname = raw ? decode(raw, strlen(raw), "MVMC_HOSTNAME") : NULL;
	if (!(raw = get_param("MVMC_ROOT")))
		fail("config", 0, "MVMC_ROOT is missing");
	parse_fsspec("MVMC_ROOT", raw, 3, &cfg.root);
	for (nshares = 0; get_indexed("MVMC_S", nshares); nshares++)
		;
	cfg.shares = need(calloc(nshares + 1, sizeof *cfg.shares));
	for (size_t i = 0; i < nshares; i++) {
		char name[32];
		snprintf(name, sizeof name, "MVMC_S%zu", i);
		parse_fsspec(name, get_param(name), 4, &cfg.shares[i]);
	}
	cfg.nshares = nshares;
}

/* ---------------------------------------------------------------- filesystems */

static void mount_share(const struct fsspec *spec, const char *target, int readonly)
{
	int p9 = strcmp(spec->fs, "9p") == 0;
	mount_at(spec->tag, target, spec->fs, readonly ? MS_RDONLY : 0,
		 p9 ? (readonly ? P9_OPTS_RO : P9_OPTS_RW) : NULL);
}

static void mount_root(void)
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
static void switch_root(void)
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
static void mount_api_filesystems(void)
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

/* After the API filesystems, so that a share under /tmp or /run is not hidden by a tmpfs. */
static void mount_shares(void)
{
	for (size_t i = 0; i < cfg.nshares; i++) {
		make_dirs("mount", cfg.shares[i].path);
		mount_share(&cfg.shares[i], cfg.shares[i].path, strcmp(cfg.shares[i].mode, "ro") == 0);
	}
	/* overlay-ro: the mount points a read-only image lacked are made; now the root is read-only */
	if (strcmp(cfg.root.mode, "overlay-ro") == 0) {
		step("remount / read-only");
		if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
			fail("mount", errno, "remount / read-only");
	}
}

/* ---------------------------------------------------------------- the program */

/* execvpe() with the PATH of the program's environment, not init's, and no sh fallback. */
static void exec_program(char **argv, char **envp)
{
	const char *file = argv[0], *path = "/bin:/usr/bin";
	int saw_eacces = 0;
	if (!*file) {
		errno = ENOENT;
		return;
	}
	if (strchr(file, '/')) {
		execve(file, argv, envp);
		return;
	}
	for (char **e = envp; *e; e++)
		if (strncmp(*e, "PATH=", 5) == 0) {
			path = *e + 5;
			break;
		}
	for (const char *dir = path;; dir++) {
		const char *end = strchrnul(dir, ':');
		char full[PATH_MAX];
		/* an empty PATH element is the current directory */
		int n = snprintf(full, sizeof full, "%.*s%s%s", (int)(end - dir), dir,
				 end == dir ? "" : "/", file);
		if (n > 0 && (size_t)n < sizeof full) {
			execve(full, argv, envp);
			if (errno == EACCES)
				saw_eacces = 1;
			else if (errno != ENOENT && errno != ENOTDIR && errno != ENODEV &&
				 errno != ESTALE && errno != ETIMEDOUT)
				return;
		}
		if (!*end)
			break;
		dir = end;
	}
	errno = saw_eacces ? EACCES : ENOENT;
}

enum { CHILD_CHDIR, CHILD_EXEC };

static void __attribute__((noreturn)) child_fail(int pipe_fd, int stage)
{
	int msg[2] = {stage, errno};
	write_all(pipe_fd, (const char *)msg, sizeof msg);
	_exit(127);
}

static void __attribute__((noreturn)) run_child(int pipe_fd)
{
	sigset_t none;
	setsid();
	if (dup2(ports[PORT_STDIN], 0) < 0 || dup2(ports[PORT_STDOUT], 1) < 0 ||
	    dup2(ports[PORT_STDERR], 2) < 0)
		child_fail(pipe_fd, CHILD_EXEC);
	/* everything of init's is close-on-exec already; this also drops anything inherited */
	if (pipe_fd > 3)
		close_range(3, pipe_fd - 1, 0);
	close_range(pipe_fd + 1, ~0U, 0);
	if (chdir(cfg.cwd) < 0)
		child_fail(pipe_fd, CHILD_CHDIR);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	exec_program(cfg.argv, cfg.envp);
	child_fail(pipe_fd, CHILD_EXEC);
}

/* The host's requests on the control port, one line each: `signal <n>` sends signal n to the
 * program. Unknown lines are ignored; when the port closes or fails, it is no longer read. */
struct control {
	int fd;
	char line[64];
	size_t len;
};

static void control_line(const char *line, pid_t pid)
{
	char *end;
	if (strncmp(line, "signal ", 7) != 0)
		return;
	long sig = strtol(line + 7, &end, 10);
	if (*end || end == line + 7 || sig < 1 || sig >= NSIG)
		return;
	step("the host sends signal %ld", sig);
	kill(pid, (int)sig);
}

static void read_control(struct control *c, pid_t pid)
{
	char buf[256];
	ssize_t n = read(c->fd, buf, sizeof buf);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n <= 0) {
		c->fd = -1; /* closed (or no host connected): poll ignores a negative fd */
		return;
	}
	for (ssize_t i = 0; i < n; i++) {
		if (buf[i] != '\n') {
			if (c->len < sizeof c->line - 1)
				c->line[c->len++] = buf[i];
			continue;
		}
		c->line[c->len] = '\0';
		control_line(c->line, pid);
		c->len = 0;
	}
}

static void on_signal(int sig)
{
	(void)sig; /* never runs: the signals stay blocked and are read from a signalfd */
}

static void __attribute__((noreturn)) run_program(void)
{
	static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
	struct sigaction sa = {.sa_handler = on_signal};
	sigset_t waited;
	int pipe_fds[2], msg[2];

	/* PID 1 gets only signals it handles: install handlers, block, take them synchronously */
	sigemptyset(&waited);
	sigaddset(&waited, SIGCHLD);
	sigaction(SIGCHLD, &sa, NULL);
	for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) {
		sigaddset(&waited, forwarded[i]);
		sigaction(forwarded[i], &sa, NULL);
	}
	sigprocmask(SIG_BLOCK, &waited, NULL);

	if (pipe2(pipe_fds, O_CLOEXEC) < 0)
		fail("exec", errno, "pipe");
	step("exec %s", cfg.argv[0]);
	pid_t pid = fork();
	if (pid < 0)
		fail("exec", errno, "fork");
	if (pid == 0)
		run_child(pipe_fds[1]);
	close(pipe_fds[1]);

	/* the pipe closes empty on a successful exec, or carries {stage, errno} */
	ssize_t n;
	while ((n = read(pipe_fds[0], msg, sizeof msg)) < 0 && errno == EINTR)
		;
	close(pipe_fds[0]);
	if (n == sizeof msg && msg[0] == CHILD_CHDIR)
		fail("chdir", msg[1], "chdir %s", cfg.cwd);
	if (n == sizeof msg)
		fail("exec", msg[1], "%s", cfg.argv[0]);
	report("time exec %ld", uptime_ms());
	report("started");

	/* Signals (SIGCHLD and those sent to PID 1 inside the guest) and the host's requests on the
	 * control port, in one poll. */
	int sigfd = signalfd(-1, &waited, SFD_CLOEXEC);
	if (sigfd < 0)
		fail("exec", errno, "signalfd");
	struct control control = {.fd = ports[PORT_CONTROL]};
	for (;;) {
		struct pollfd fds[2] = {{.fd = sigfd, .events = POLLIN}, {.fd = control.fd, .events = POLLIN}};
		if (poll(fds, 2, -1) < 0)
			continue;
		if (fds[1].revents)
			read_control(&control, pid);
		if (!(fds[0].revents & POLLIN))
			continue;
		struct signalfd_siginfo info;
		if (read(sigfd, &info, sizeof info) != sizeof info)
			continue;
		int sig = (int)info.ssi_signo, status;
		if (sig != SIGCHLD) {
			step("forward signal %d", sig);
			kill(pid, sig);
			continue;
		}
		pid_t reaped;
		while ((reaped = waitpid(-1, &status, WNOHANG)) > 0) {
			if (reaped != pid)
				continue; /* an orphan reparented to us */
			step("program ended, status 0x%x", status);
			report("time exit %ld", uptime_ms());
			if (WIFSIGNALED(status))
				finish("signal %d", WTERMSIG(status));
			finish("exit %d", WEXITSTATUS(status));
		}
	}
}

int main(void)
{
	if (getpid() != 1) {
		/* kill(-1, SIGKILL) and reboot() must never run on a host by mistake */
		fprintf(stderr, "microvmc init: must run as PID 1\n");
		return 1;
	}
	long started_ms = uptime_ms(), modules_ms, ports_ms;
	debug = getenv("MVMC_DEBUG") && strcmp(getenv("MVMC_DEBUG"), "1") == 0;
	mount_early();
	step("init started");
	load_modules();
	modules_ms = uptime_ms();
	open_ports();
	ports_ms = uptime_ms();
	/* the boot timeline: what happened before the status port was open, reported now */
	report("time init %ld", started_ms);
	report("time modules %ld", modules_ms);
	report("time ports %ld", ports_ms);
	check_modules();
	read_config();
	mount_root();
	switch_root();
	mount_api_filesystems();
	mount_shares();
	if (cfg.hostname) {
		step("hostname %s", cfg.hostname);
		if (sethostname(cfg.hostname, strlen(cfg.hostname)) < 0)
			fail("hostname", errno, "sethostname %s", cfg.hostname);
	}
	report("time mounts %ld", uptime_ms());
	run_program();
}
