/*
 * microvmc guest init: PID 1 of the initramfs.
 *
 * Mounts the kernel filesystems, loads the modules listed in /microvmc/modules, opens the
 * virtio-serial ports, mounts the root described by MVMC_ROOT, switches into it, mounts the
 * shares, runs the program with its stdio relayed to the ports (pipes, or a pty), serves exec
 * sessions on the channel, reports the program's fate on the status port, then reboots (which,
 * with reboot=t and QEMU's -no-reboot, ends the VM). PROTOCOL.md is the contract.
 *
 * Built by microvmc with: gcc -static -Os -s -Wall -Wextra -Werror -o init *.c
 */
#include "init.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#define RELAY_SIZE 65536
#define STOP_DEADLINE_MS 1000 /* after the program ends, what is left gets this long to die */
#define MAX_POLL 1024
#define TTY_SIZE_WAIT_MS 1000 /* for the host's first `resize` */

/* Bytes on their way from one descriptor to another, never blocking the loop. */
struct relay {
	int from, to; /* -1 once done */
	char buf[RELAY_SIZE];
	size_t len, off;
	int eof; /* `from` is at its end (or was closed) */
	unsigned long long sent; /* bytes written to `to` */
};

static struct relay r_in, r_out, r_err; /* stdin port → program; program → stdout/stderr ports */
static struct procspec *program;
static pid_t program_pid; /* 0 until it runs */
static int program_tty_master = -1;
static int program_status, program_ended;
static long stop_deadline;
static int closed_early[2]; /* `close stdout|stderr` before the program ran */
static int sized;	    /* the host said the terminal's size */
static int undrained[2];    /* stdout, stderr: sent bytes the host has not yet said it read (`drained`) */

static void relay_init(struct relay *r, int from, int to)
{
	r->from = from;
	r->to = to;
	r->len = r->off = 0;
	r->eof = 0;
	r->sent = 0;
}

static int relay_pollfds(struct relay *r, struct pollfd *fds)
{
	int n = 0;
	if (r->from >= 0 && !r->eof && r->len == r->off)
		fds[n++] = (struct pollfd){.fd = r->from, .events = POLLIN};
	if (r->to >= 0 && r->len > r->off)
		fds[n++] = (struct pollfd){.fd = r->to, .events = POLLOUT};
	return n;
}

static void relay_read(struct relay *r)
{
	ssize_t n = read(r->from, r->buf, sizeof r->buf);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n > 0) {
		r->len = n;
		r->off = 0;
		return;
	}
	r->eof = 1; /* end of file; EIO: a pty whose slaves are all closed */
}

static void relay_write(struct relay *r)
{
	ssize_t n = write(r->to, r->buf + r->off, r->len - r->off);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0) { /* the program closed its stdin (EPIPE), or the port failed: drop the bytes */
		r->len = r->off = 0;
		r->to = -1;
		return;
	}
	r->off += n;
	r->sent += n;
	if (r->off == r->len)
		r->len = r->off = 0;
}

static void relay_events(struct relay *r, const struct pollfd *fds, int n)
{
	for (int i = 0; i < n; i++) {
		if (!fds[i].revents)
			continue;
		if (fds[i].events & POLLIN)
			relay_read(r);
		else if (r->to >= 0 && r->len > r->off)
			relay_write(r);
	}
}

/* Output relays end when their source is done and everything read was written. */
static void relay_settle_output(struct relay *r)
{
	if (r->eof && r->from >= 0 && r->from != program_tty_master) {
		close(r->from);
	}
	if (r->eof)
		r->from = -1;
}

/* The program's stdin: when the host's ends, the program's does (a pty has no end of input). */
static void relay_settle_input(struct relay *r)
{
	if (r->eof && r->len == r->off && r->to >= 0) {
		if (r->to != program_tty_master)
			close(r->to);
		r->to = -1;
	}
}

static int output_done(const struct relay *r)
{
	return r->from < 0 && (r->to < 0 || r->len == r->off);
}

static void close_output(struct relay *r)
{
	/* the host's reader went away: so does the program's, which now gets EPIPE (SIGPIPE) */
	if (r->from >= 0 && r->from != program_tty_master)
		close(r->from);
	else if (r->from >= 0) {
		close(program_tty_master);
		program_tty_master = -1;
		r_in.to = -1;
	}
	r->from = -1;
	r->eof = 1;
	r->len = r->off = 0;
	r->to = -1;
}

static void start_program(void)
{
	struct started st;
	int stage, err;
	step("exec %s", program->argv[0]);
	if (start_process(program, &st, &stage, &err) < 0) {
		errno = err;
		if (stage == CHILD_CHDIR)
			fail("chdir", err, "chdir %s", program->cwd);
		if (stage == CHILD_EXEC)
			fail("exec", err, "%s", program->argv[0]);
		fail(stage_name(stage), err, "%s", program->argv[0]);
	}
	program_pid = st.pid;
	if (program->tty)
		program_tty_master = st.in;
	relay_init(&r_in, ports[PORT_STDIN], st.in);
	relay_init(&r_out, st.out, ports[PORT_STDOUT]);
	relay_init(&r_err, st.err, ports[PORT_STDERR]); /* with a pty: nothing (from = -1) */
	report("time exec %ld", uptime_ms());
	report("started");
	if (closed_early[0])
		close_output(&r_out);
	if (closed_early[1])
		close_output(&r_err);
}

/* The host's requests on the control port, one line each (PROTOCOL.md). */
static void control_line(const char *line)
{
	char *end;
	if (strncmp(line, "signal ", 7) == 0) {
		long sig = strtol(line + 7, &end, 10);
		if (*end || end == line + 7 || sig < 1 || sig >= NSIG || !program_pid || program_ended)
			return;
		step("the host sends signal %ld", sig);
		kill(program_pid, (int)sig);
	} else if (strcmp(line, "start") == 0) {
		if (!program_pid)
			start_program();
	} else if (strncmp(line, "resize ", 7) == 0) {
		long rows = strtol(line + 7, &end, 10), cols = *end == ' ' ? strtol(end + 1, &end, 10) : -1;
		if (*end || rows < 0 || rows > 65535 || cols < 0 || cols > 65535 || !program->tty)
			return;
		program->rows = rows;
		program->cols = cols;
		sized = 1;
		if (program_tty_master >= 0)
			set_window(program_tty_master, rows, cols);
	} else if (strcmp(line, "close stdout") == 0 || strcmp(line, "close stderr") == 0) {
		struct relay *r = strcmp(line + 6, "stdout") == 0 ? &r_out : &r_err;
		if (program_pid)
			close_output(r);
		else
			closed_early[r == &r_err] = 1;
	} else if (strcmp(line, "drained stdout") == 0 || strcmp(line, "drained stderr") == 0) {
		undrained[strcmp(line + 8, "stderr") == 0] = 0;
	} else if (strcmp(line, "channel") == 0) {
		channel_attach(ports[PORT_CHANNEL]);
	}
}

static void read_control(void)
{
	static char line[128];
	static size_t len;
	char buf[256];
	ssize_t n = read(ports[PORT_CONTROL], buf, sizeof buf);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n <= 0) {
		ports[PORT_CONTROL] = -1; /* closed (or no host connected): no more requests */
		return;
	}
	for (ssize_t i = 0; i < n; i++) {
		if (buf[i] != '\n') {
			if (len < sizeof line - 1)
				line[len++] = buf[i];
			continue;
		}
		line[len] = '\0';
		control_line(line);
		len = 0;
	}
}

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (pid == program_pid && !program_ended) {
			step("program ended, status 0x%x", status);
			report("time exit %ld", uptime_ms());
			program_ended = 1;
			program_status = status;
			/* the VM ends with the program: everything else is stopped now, so pipes see their end */
			channel_stop();
			kill(-1, SIGKILL);
			stop_deadline = uptime_ms() + STOP_DEADLINE_MS;
			continue;
		}
		channel_reaped(pid, status); /* else an orphan reparented to us */
	}
}

static int done(void)
{
	if (!program_ended)
		return 0;
	int late = uptime_ms() > stop_deadline;
	if (late) {
		/* what is still alive holds the output open: take what it wrote and stop waiting */
		for (struct relay *r = &r_out; r; r = r == &r_out ? &r_err : NULL)
			if (r->from >= 0 && r->len == r->off) {
				relay_read(r);
				if (r->len == r->off)
					r->eof = 1;
			}
	}
	relay_settle_output(&r_out);
	relay_settle_output(&r_err);
	return output_done(&r_out) && output_done(&r_err) && (channel_idle() || late);
}

/*
 * The VM must not end while QEMU still holds output: what the guest wrote to a port sits in its
 * virtqueue until QEMU has written it to the host's pipe, which a slow (or descheduled) reader leaves
 * full, and QEMU drops the queue when the VM ends. So the host says when it has read every byte
 * (`sent` → `drained`, PROTOCOL.md); init waits for that, or for the host to close the control port.
 */
static void announce_output(void)
{
	struct relay *out[2] = {&r_out, &r_err};
	for (int i = 0; i < 2; i++)
		if (out[i]->sent) {
			undrained[i] = 1;
			report("sent %s %llu", i ? "stderr" : "stdout", out[i]->sent);
		}
}

static void await_drained(void)
{
	if (undrained[0] || undrained[1])
		step("waiting for the host to read all output");
	while ((undrained[0] || undrained[1]) && ports[PORT_CONTROL] >= 0) {
		struct pollfd pfd = {.fd = ports[PORT_CONTROL], .events = POLLIN};
		if (poll(&pfd, 1, -1) > 0)
			read_control();
	}
}

static void __attribute__((noreturn)) loop(int sigfd)
{
	static struct pollfd fds[MAX_POLL];
	for (;;) {
		int n = 0, n_sig, n_ctl = -1, in0, in_n, out0, out_n, err0, err_n, ch0, ch_n;
		if (done()) {
			announce_output();
			before_reboot = await_drained;
			if (WIFSIGNALED(program_status))
				finish("signal %d", WTERMSIG(program_status));
			finish("exit %d", WEXITSTATUS(program_status));
		}
		relay_settle_input(&r_in);
		fds[n++] = (struct pollfd){.fd = sigfd, .events = POLLIN};
		n_sig = 0;
		if (ports[PORT_CONTROL] >= 0) {
			n_ctl = n;
			fds[n++] = (struct pollfd){.fd = ports[PORT_CONTROL], .events = POLLIN};
		}
		in0 = n;
		n += in_n = program_pid && !program_ended ? relay_pollfds(&r_in, fds + n) : 0;
		out0 = n;
		n += out_n = program_pid ? relay_pollfds(&r_out, fds + n) : 0;
		err0 = n;
		n += err_n = program_pid ? relay_pollfds(&r_err, fds + n) : 0;
		ch0 = n;
		n += ch_n = channel_pollfds(fds + n, MAX_POLL - n);
		int timeout = program_ended ? 10 : -1;
		if (poll(fds, n, timeout) < 0)
			continue;
		if (fds[n_sig].revents & POLLIN) {
			struct signalfd_siginfo info;
			while (read(sigfd, &info, sizeof info) == sizeof info) {
				if (info.ssi_signo == SIGCHLD)
					reap();
				else if (program_pid && !program_ended) {
					step("forward signal %u", info.ssi_signo);
					kill(program_pid, (int)info.ssi_signo);
				}
			}
		}
		if (n_ctl >= 0 && fds[n_ctl].revents)
			read_control();
		relay_events(&r_in, fds + in0, in_n);
		relay_events(&r_out, fds + out0, out_n);
		relay_events(&r_err, fds + err0, err_n);
		channel_events(fds + ch0, ch_n);
	}
}

static int setup_signals(void)
{
	static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
	sigset_t waited;
	/* PID 1 gets only signals it handles: block them and take them synchronously */
	sigemptyset(&waited);
	sigaddset(&waited, SIGCHLD);
	for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
		sigaddset(&waited, forwarded[i]);
	sigprocmask(SIG_BLOCK, &waited, NULL);
	signal(SIGPIPE, SIG_IGN); /* a closed reader is an EPIPE to handle, not a signal */
	int sigfd = signalfd(-1, &waited, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sigfd < 0)
		fail("exec", errno, "signalfd");
	return sigfd;
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
	/* The host stamps this line as it arrives on the console: when init started, by the host's
	 * clock (the kernel's phases in the run's timeline). Keep it in step with backends/supervise.py. */
	static const char started_mark[] = "microvmc-init: started\n";
	write_all(console, started_mark, sizeof started_mark - 1);
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
	program = cfg.program;
	mount_root();
	switch_root();
	mount_api_filesystems();
	network_up(); /* before the shares: the MVMC_M<n> mounts bind its /etc/hosts and /etc/resolv.conf */
	mount_shares();
	if (cfg.hostname) {
		step("hostname %s", cfg.hostname);
		if (sethostname(cfg.hostname, strlen(cfg.hostname)) < 0)
			fail("hostname", errno, "sethostname %s", cfg.hostname);
	}
	report("time mounts %ld", uptime_ms());
	int sigfd = setup_signals();
	if (program->tty && !program->rows) {
		/* MVMC_TTY=1: the host sends the terminal's size first; the program starts with it */
		long deadline = uptime_ms() + TTY_SIZE_WAIT_MS;
		while (!sized && ports[PORT_CONTROL] >= 0 && uptime_ms() < deadline) {
			struct pollfd pfd = {.fd = ports[PORT_CONTROL], .events = POLLIN};
			if (poll(&pfd, 1, deadline - uptime_ms()) > 0)
				read_control();
		}
	}
	if (cfg.hold)
		report("ready"); /* the program runs when the host writes `start` */
	else
		start_program();
	loop(sigfd);
}
