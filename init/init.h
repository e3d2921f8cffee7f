/*
 * microvmc guest init: what its parts share. PROTOCOL.md is the contract with the host.
 *
 *   util.c     reporting (status port, console), failing, small helpers
 *   config.c   MVMC_* parameters: decoding, the boot configuration, process specs
 *   boot.c     early mounts, modules, ports, the root and the shares
 *   process.c  starting a program: stdio pipes or a pty, user, limits, cwd, exec
 *   channel.c  the exec channel: framed sessions for further processes
 *   net.c      lo, and the network device's addresses, routes (rtnetlink), hosts and resolv.conf
 *   init.c     main: boot, then one poll loop over the program, the ports and the channel
 */
#ifndef MICROVMC_INIT_H
#define MICROVMC_INIT_H

#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <sys/resource.h>
#include <sys/types.h>

/* ---------------------------------------------------------------- ports (boot.c) */

enum port { PORT_STATUS, PORT_STDIN, PORT_STDOUT, PORT_STDERR, PORT_CONTROL, PORT_CHANNEL, NPORTS };
extern int ports[NPORTS];
extern const char *const port_names[NPORTS];

/* ---------------------------------------------------------------- util.c */

extern int console; /* the kernel's /dev/console until boot opens our own */
extern int debug;

long uptime_ms(void);
int write_all(int fd, const void *buf, size_t len);
void sleep_ms(long ms);
char *read_file(const char *path); /* NUL-terminated, malloc'd; NULL with errno */
void *need(void *p);               /* p, or a config error (out of memory) */
void step(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* one report line, formatted as report() does, into buf; returns its length (with the '\n') */
size_t format_report(char *buf, size_t size, const char *fmt, va_list ap);
void kill_and_reap_all(void);
/* The end of the VM: sync, the last report, before_reboot() if set, reboot. */
extern void (*before_reboot)(void);
void finish(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void fail(const char *stage, int err, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
void set_nonblocking(int fd);

/* ---------------------------------------------------------------- config.c */

struct fsspec {
	char *fs, *tag, *mode, *path;
};

struct limit {
	int resource;
	struct rlimit value;
};

/* What a process is started with: session 0 (the program) and every exec. */
struct procspec {
	char **argv, **envp;
	char *cwd;
	int has_user;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	size_t ngroups;
	struct limit *limits;
	size_t nlimits;
	int tty; /* a pty as the controlling terminal, of rows x cols */
	unsigned short rows, cols;
};

struct params; /* NAME=value pairs, values still encoded */

struct params *params_new(void);
void params_set(struct params *p, const char *entry, size_t len); /* "NAME=value", len bytes */
const char *params_get(const struct params *p, const char *name);
void params_free(struct params *p);

char *decode(const char *s, size_t len, const char *what);
/* The spec from NAME=value pairs: A<n>, E<n>, CWD, USER, R<n>, TTY with `prefix` before each name
 * ("MVMC_" on the kernel command line, "" in an exec request). Returns NULL and sets *error (a
 * static message) on bad input; never fails the VM. */
struct procspec *procspec_parse(const struct params *p, const char *prefix, const char **error);
void procspec_free(struct procspec *spec);

/* MVMC_M<n>: a mount made after the shares, in order. bind: a to b; tmpfs: at a, data b;
 * detach: unmount a (a hidden share, bound from) and remove its directory. */
enum mountop_kind { OP_BIND, OP_TMPFS, OP_DETACH };
struct mountop {
	enum mountop_kind kind;
	int readonly;
	char *a, *b;
};

extern struct config {
	struct procspec *program;
	char *hostname;
	struct fsspec root, *shares;
	size_t nshares;
	struct mountop *ops;
	size_t nops;
	int hold; /* MVMC_HOLD: run the program only when the host says `start` */
	char *net; /* MVMC_NET, still encoded: addresses:gateways:dns, NULL for no network device */
} cfg;

void read_config(void);

/* ---------------------------------------------------------------- boot.c */

void mount_early(void);
void load_modules(void);
void check_modules(void);
void open_ports(void);
void mount_root(void);
void switch_root(void);
void mount_api_filesystems(void);
void mount_shares(void);

/* ---------------------------------------------------------------- net.c */

void network_up(void); /* lo, and with MVMC_NET the network device, its route, hosts and resolv.conf */

/* ---------------------------------------------------------------- process.c */

enum { CHILD_CHDIR = 1, CHILD_EXEC, CHILD_USER, CHILD_LIMIT, CHILD_TTY };

/* A started process and the init ends of its stdio: with a pty, `in` and `out` are the master and
 * `err` is -1. All non-blocking and close-on-exec. */
struct started {
	pid_t pid;
	int in, out, err;
};

/* Starts spec; on failure returns -1 with *stage (CHILD_*) and *err (errno) set, nothing left open. */
int start_process(const struct procspec *spec, struct started *out, int *stage, int *err);
const char *stage_name(int stage);
void set_window(int master, unsigned short rows, unsigned short cols);

/* ---------------------------------------------------------------- channel.c */

struct pollfd;

void channel_attach(int fd);           /* the host connected (control line `channel`) */
int channel_pollfds(struct pollfd *fds, int max); /* adds what the channel waits for */
void channel_events(struct pollfd *fds, int n);   /* handles what poll returned for them */
int channel_reaped(pid_t pid, int status);        /* 1 if pid was an exec session's */
int channel_idle(void);                /* nothing left to send */
void channel_stop(void);               /* the VM ends: every session is killed */

#endif
