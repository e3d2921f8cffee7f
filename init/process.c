/* Starting a program: its stdio as pipes or a pty, its limits, user, working directory, exec. */
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

const char *stage_name(int stage)
{
	switch (stage) {
	case CHILD_CHDIR:
		return "chdir";
	case CHILD_USER:
		return "user";
	case CHILD_LIMIT:
		return "rlimit";
	case CHILD_TTY:
		return "tty";
	default:
		return "exec";
	}
}

void set_window(int master, unsigned short rows, unsigned short cols)
{
	struct winsize ws = {.ws_row = rows, .ws_col = cols};
	ioctl(master, TIOCSWINSZ, &ws);
}

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
		int n = snprintf(full, sizeof full, "%.*s%s%s", (int)(end - dir), dir, end == dir ? "" : "/", file);
		if (n > 0 && (size_t)n < sizeof full) {
			execve(full, argv, envp);
			if (errno == EACCES)
				saw_eacces = 1;
			else if (errno != ENOENT && errno != ENOTDIR && errno != ENODEV && errno != ESTALE &&
				 errno != ETIMEDOUT)
				return;
		}
		if (!*end)
			break;
		dir = end;
	}
	errno = saw_eacces ? EACCES : ENOENT;
}

static void __attribute__((noreturn)) child_fail(int report_fd, int stage)
{
	int msg[2] = {stage, errno};
	write_all(report_fd, msg, sizeof msg);
	_exit(127);
}

static void __attribute__((noreturn))
run_child(const struct procspec *spec, int report_fd, int in, int out, int err, const char *tty)
{
	sigset_t none;
	setsid();
	if (tty) {
		/* a session leader opening a terminal without O_NOCTTY makes it its controlling one */
		int slave = open(tty, O_RDWR);
		if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
			child_fail(report_fd, CHILD_TTY);
		if (spec->has_user && fchown(slave, spec->uid, -1) < 0)
			child_fail(report_fd, CHILD_TTY);
		in = out = err = slave;
	}
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
		child_fail(report_fd, CHILD_EXEC);
	/* everything of init's is close-on-exec already; this also drops anything inherited (the system
	 * call itself: musl 1.2.3 has no close_range wrapper) */
	if (report_fd > 3)
		syscall(SYS_close_range, 3, report_fd - 1, 0);
	syscall(SYS_close_range, report_fd + 1, ~0U, 0);
	for (size_t i = 0; i < spec->nlimits; i++)
		if (setrlimit(spec->limits[i].resource, &spec->limits[i].value) < 0)
			child_fail(report_fd, CHILD_LIMIT);
	if (spec->has_user) {
		if (setgroups(spec->ngroups, spec->groups) < 0 || setgid(spec->gid) < 0 || setuid(spec->uid) < 0)
			child_fail(report_fd, CHILD_USER);
	} else if (setgroups(0, NULL) < 0) {
		child_fail(report_fd, CHILD_USER);
	}
	if (chdir(spec->cwd) < 0)
		child_fail(report_fd, CHILD_CHDIR);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	exec_program(spec->argv, spec->envp);
	child_fail(report_fd, CHILD_EXEC);
}

static void close_all(int *fds, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (fds[i] >= 0) {
			close(fds[i]);
			fds[i] = -1;
		}
}

static int open_master(char *name, size_t size)
{
	int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0)
		master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0)
		return -1;
	if (unlockpt(master) < 0 || ptsname_r(master, name, size) != 0) {
		int e = errno;
		close(master);
		errno = e;
		return -1;
	}
	return master;
}

int start_process(const struct procspec *spec, struct started *out, int *stage, int *err)
{
	/* fds: stdin r/w, stdout r/w, stderr r/w, the exec report pipe r/w, the pty master */
	int fds[9] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};
	char tty[64];
	int msg[2];
	ssize_t n;
	*stage = CHILD_TTY;
	if (spec->tty) {
		if ((fds[8] = open_master(tty, sizeof tty)) < 0)
			goto failed;
		set_window(fds[8], spec->rows, spec->cols);
	} else {
		*stage = CHILD_EXEC;
		if (pipe2(fds, O_CLOEXEC) < 0 || pipe2(fds + 2, O_CLOEXEC) < 0 || pipe2(fds + 4, O_CLOEXEC) < 0)
			goto failed;
	}
	*stage = CHILD_EXEC;
	if (pipe2(fds + 6, O_CLOEXEC) < 0)
		goto failed;
	pid_t pid = fork();
	if (pid < 0)
		goto failed;
	if (pid == 0)
		run_child(spec, fds[7], fds[0], fds[3], fds[5], spec->tty ? tty : NULL);
	close(fds[7]);
	fds[7] = -1;
	/* the pipe closes empty on a successful exec, or carries {stage, errno} */
	while ((n = read(fds[6], msg, sizeof msg)) < 0 && errno == EINTR)
		;
	if (n == sizeof msg) {
		waitpid(pid, NULL, 0);
		*stage = msg[0];
		*err = msg[1];
		close_all(fds, 9);
		return -1;
	}
	close(fds[6]);
	fds[6] = -1;
	if (spec->tty) {
		out->in = out->out = fds[8];
		out->err = -1;
		set_nonblocking(fds[8]);
	} else {
		close(fds[0]);
		close(fds[3]);
		close(fds[5]);
		out->in = fds[1];
		out->out = fds[2];
		out->err = fds[4];
		set_nonblocking(out->in);
		set_nonblocking(out->out);
		set_nonblocking(out->err);
	}
	out->pid = pid;
	return 0;
failed:
	*err = errno;
	close_all(fds, 9);
	return -1;
}
