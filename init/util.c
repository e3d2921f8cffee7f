/* Reporting on the status port and the console, failing, and small helpers. */
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REAP_DEADLINE_MS 1000

int console = 2;
int debug;
void (*before_reboot)(void);

long uptime_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int write_all(int fd, const void *data, size_t len)
{
	const char *buf = data;
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			struct timespec ts = {0, 1000000};
			nanosleep(&ts, NULL);
			continue;
		}
		if (n <= 0)
			return -1;
		buf += n;
		len -= n;
	}
	return 0;
}

void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

void set_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	if (flags >= 0)
		fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

char *read_file(const char *path)
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

void *need(void *p)
{
	if (!p)
		fail("config", ENOMEM, "out of memory");
	return p;
}

/* One report line: truncated to fit, line breaks in values replaced, '\n' appended. */
size_t format_report(char *buf, size_t size, const char *fmt, va_list ap)
{
	int n = vsnprintf(buf, size - 1, fmt, ap);
	size_t len = n < 0 ? 0 : (size_t)n < size - 1 ? (size_t)n : size - 2;
	for (size_t i = 0; i < len; i++)
		if (buf[i] == '\n' || buf[i] == '\r')
			buf[i] = '?';
	buf[len++] = '\n';
	return len;
}

void step(const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	if (!debug)
		return;
	int n = snprintf(line, sizeof line, "microvmc-init [%ld ms]: ", uptime_ms());
	va_start(ap, fmt);
	size_t len = format_report(line + n, sizeof line - n, fmt, ap);
	va_end(ap);
	write_all(console, line, n + len);
}

static void vreport(const char *fmt, va_list ap)
{
	char line[1024];
	size_t len = format_report(line, sizeof line, fmt, ap);
	int sent = ports[PORT_STATUS] >= 0 && write_all(ports[PORT_STATUS], line, len) == 0;
	if (!sent || debug)
		write_all(console, line, len);
}

void report(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport(fmt, ap);
	va_end(ap);
}

/* Kills whatever is left, waits a little for it to go, so that sync() sees all writes. */
void kill_and_reap_all(void)
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
void finish(const char *fmt, ...)
{
	va_list ap;
	kill_and_reap_all();
	sync();
	va_start(ap, fmt);
	vreport(fmt, ap);
	va_end(ap);
	if (before_reboot)
		before_reboot();
	reboot(RB_AUTOBOOT);
	for (;;) /* unreachable in practice; PID 1 must never return */
		pause();
}

void fail(const char *stage, int err, const char *fmt, ...)
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
