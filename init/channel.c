/*
 * The exec channel: any number of process sessions multiplexed over one byte stream (the `channel`
 * virtio-serial port today; a vsock connection works the same way), with flow control per stream so
 * that one stalled reader never blocks another session. Frames and their meaning: PROTOCOL.md.
 */
#include "init.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define HEADER 12
#define PAYLOAD_MAX 65536
#define WINDOW 65536	       /* bytes a sender may have unacknowledged per stream, initially */
#define QUEUE_HIGH (256 * 1024) /* stop reading programs' output while this much waits to be sent */
#define OUTPUT_GRACE_MS 2000    /* after a process exits, how long its output may stay open */
#define MAX_SESSIONS 256

enum frame { F_EXEC = 1, F_REPORT, F_DATA, F_EOF, F_WINDOW, F_SIGNAL, F_RESIZE, F_CLOSE };
enum stream { S_IN, S_OUT, S_ERR };

struct session {
	uint32_t id;
	pid_t pid;
	int tty;
	int in;	       /* to the process: a pipe's write end, or the pty master; -1 once closed */
	int fd[3];     /* fd[S_OUT], fd[S_ERR]: from the process, -1 at end (with a pty, fd[S_OUT] is the master) */
	char *pending; /* stdin received, not yet written: at most WINDOW bytes */
	size_t len, off;
	int in_eof;		 /* the host ended stdin */
	uint32_t window[3];	 /* output the host allows us to send, per stream */
	int exited, status;	 /* reaped, and how it ended */
	long exited_ms;
};

static int chan = -1; /* the channel, while the host is connected */
static struct session *sessions[MAX_SESSIONS];
static size_t nsessions;
static char *queue; /* frames waiting to be written to the channel */
static size_t qlen, qoff, qcap;
static unsigned char inbuf[HEADER + PAYLOAD_MAX];
static size_t inlen;

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void enqueue(int type, int stream, uint32_t id, const void *payload, size_t len)
{
	if (chan < 0)
		return;
	if (qoff > 0 && qoff == qlen)
		qoff = qlen = 0;
	if (qlen + HEADER + len > qcap) {
		if (qoff > 0) {
			memmove(queue, queue + qoff, qlen - qoff);
			qlen -= qoff;
			qoff = 0;
		}
		while (qlen + HEADER + len > qcap)
			qcap = qcap ? qcap * 2 : 65536;
		queue = need(realloc(queue, qcap));
	}
	unsigned char *h = (unsigned char *)queue + qlen;
	h[0] = type;
	h[1] = stream;
	h[2] = h[3] = 0;
	put32(h + 4, id);
	put32(h + 8, len);
	if (len)
		memcpy(h + HEADER, payload, len);
	qlen += HEADER + len;
}

static void __attribute__((format(printf, 2, 3))) session_report(uint32_t id, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	size_t len = format_report(line, sizeof line, fmt, ap);
	va_end(ap);
	enqueue(F_REPORT, 0, id, line, len - 1); /* without the '\n': a frame is one report */
}

static void grant(uint32_t id, int stream, uint32_t bytes)
{
	unsigned char p[4];
	put32(p, bytes);
	enqueue(F_WINDOW, stream, id, p, 4);
}

static struct session *find(uint32_t id)
{
	for (size_t i = 0; i < nsessions; i++)
		if (sessions[i]->id == id)
			return sessions[i];
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* Closes one output of a session; with a pty the master is the only descriptor: all of it goes. */
static void close_output(struct session *s, int stream)
{
	if (s->tty) {
		close_fd(&s->fd[S_OUT]);
		s->in = -1;
		return;
	}
	close_fd(&s->fd[stream]);
}

static void close_input(struct session *s)
{
	if (s->tty)
		return; /* the master is also the output; the host's end of input is not the terminal's */
	close_fd(&s->in);
}

static void drop(size_t index)
{
	struct session *s = sessions[index];
	close_input(s);
	close_output(s, S_OUT);
	close_output(s, S_ERR);
	free(s->pending);
	free(s);
	sessions[index] = sessions[--nsessions];
}

static void start_session(uint32_t id, const unsigned char *payload, size_t len)
{
	if (id == 0 || find(id)) {
		session_report(id, "error config 0 session %u is in use", id);
		return;
	}
	if (nsessions == MAX_SESSIONS) {
		session_report(id, "error exec %d too many sessions", EAGAIN);
		return;
	}
	struct params *p = params_new();
	const char *text = (const char *)payload, *end = text + len, *error;
	while (text < end) {
		const char *nl = memchr(text, '\n', end - text);
		const char *stop = nl ? nl : end;
		if (memchr(text, '=', stop - text))
			params_set(p, text, stop - text);
		text = stop + 1;
	}
	struct procspec *spec = procspec_parse(p, "", &error);
	params_free(p);
	if (!spec) {
		session_report(id, "error config 0 %s", error);
		return;
	}
	struct started st;
	int stage, err;
	step("exec session %u: %s", id, spec->argv[0]);
	if (start_process(spec, &st, &stage, &err) < 0) {
		session_report(id, "error %s %d %s: %s", stage_name(stage), err,
			       stage == CHILD_CHDIR ? spec->cwd : spec->argv[0], strerror(err));
		procspec_free(spec);
		return;
	}
	struct session *s = need(calloc(1, sizeof *s));
	s->id = id;
	s->pid = st.pid;
	s->tty = spec->tty;
	s->in = st.in;
	s->fd[S_OUT] = st.out;
	s->fd[S_ERR] = st.err;
	s->fd[S_IN] = -1;
	s->pending = need(malloc(WINDOW));
	s->window[S_OUT] = s->window[S_ERR] = WINDOW;
	sessions[nsessions++] = s;
	procspec_free(spec);
	session_report(id, "started");
}

static void detach(void)
{
	step("the host left the channel");
	for (size_t i = 0; i < nsessions; i++)
		kill(sessions[i]->pid, SIGKILL);
	while (nsessions)
		drop(0);
	chan = -1;
	qlen = qoff = inlen = 0;
}

static void stdin_data(struct session *s, const unsigned char *data, size_t len)
{
	if (s->in < 0) { /* the program closed its stdin: the bytes are dropped, and acknowledged */
		grant(s->id, S_IN, len);
		return;
	}
	if (s->len + len > WINDOW) { /* more than we allowed: the host broke the protocol */
		detach();
		return;
	}
	if (s->off > 0) {
		memmove(s->pending, s->pending + s->off, s->len - s->off);
		s->len -= s->off;
		s->off = 0;
	}
	memcpy(s->pending + s->len, data, len);
	s->len += len;
}

static void frame(const unsigned char *h, const unsigned char *payload)
{
	uint32_t id = get32(h + 4), len = get32(h + 8);
	int stream = h[1];
	if (h[0] == F_EXEC) {
		start_session(id, payload, len);
		return;
	}
	struct session *s = find(id);
	if (!s)
		return; /* it ended meanwhile */
	switch (h[0]) {
	case F_DATA:
		if (stream == S_IN)
			stdin_data(s, payload, len);
		break;
	case F_EOF:
		if (stream == S_IN)
			s->in_eof = 1;
		break;
	case F_WINDOW:
		if ((stream == S_OUT || stream == S_ERR) && len == 4) {
			uint64_t w = (uint64_t)s->window[stream] + get32(payload);
			s->window[stream] = w > UINT32_MAX ? UINT32_MAX : (uint32_t)w;
		}
		break;
	case F_SIGNAL:
		if (len == 4 && !s->exited && get32(payload) >= 1 && get32(payload) < NSIG)
			kill(s->pid, (int)get32(payload));
		break;
	case F_RESIZE:
		if (len == 4 && s->tty && s->fd[S_OUT] >= 0)
			set_window(s->fd[S_OUT], (payload[0] << 8) | payload[1], (payload[2] << 8) | payload[3]);
		break;
	case F_CLOSE:
		if (stream == S_OUT || stream == S_ERR)
			close_output(s, stream);
		break;
	}
}

static void read_channel(void)
{
	ssize_t n = read(chan, inbuf + inlen, sizeof inbuf - inlen);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		detach();
		return;
	}
	inlen += n;
	size_t at = 0;
	while (inlen - at >= HEADER) {
		uint32_t len = get32(inbuf + at + 8);
		if (len > PAYLOAD_MAX) {
			detach();
			return;
		}
		if (inlen - at < HEADER + len)
			break;
		frame(inbuf + at, inbuf + at + HEADER);
		if (chan < 0)
			return;
		at += HEADER + len;
	}
	memmove(inbuf, inbuf + at, inlen - at);
	inlen -= at;
}

static void write_channel(void)
{
	ssize_t n = write(chan, queue + qoff, qlen - qoff);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		detach();
		return;
	}
	qoff += n;
}

/* Output of a session: read what its window allows, as DATA frames; at its end, EOF. */
static void read_output(struct session *s, int stream)
{
	static char buf[32768];
	size_t want = s->window[stream] < sizeof buf ? s->window[stream] : sizeof buf;
	ssize_t n = read(s->fd[stream], buf, want);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n > 0) {
		enqueue(F_DATA, stream, s->id, buf, n);
		s->window[stream] -= n;
		return;
	}
	close_output(s, stream); /* end of file, or EIO: a pty whose every slave is closed */
	enqueue(F_EOF, stream, s->id, NULL, 0);
	if (s->tty)
		enqueue(F_EOF, S_ERR, s->id, NULL, 0);
}

static void write_input(struct session *s)
{
	ssize_t n = write(s->in, s->pending + s->off, s->len - s->off);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0) { /* EPIPE: the program closed its stdin */
		grant(s->id, S_IN, s->len - s->off);
		s->len = s->off = 0;
		close_input(s);
		s->in = -1;
		return;
	}
	s->off += n;
	grant(s->id, S_IN, n);
	if (s->off == s->len)
		s->len = s->off = 0;
}

/* A session whose process ended and whose output is done reports how it ended, and is gone. */
static void settle(void)
{
	for (size_t i = 0; i < nsessions;) {
		struct session *s = sessions[i];
		if (s->in_eof && s->len == s->off && s->in >= 0)
			close_input(s);
		if (s->exited && uptime_ms() - s->exited_ms > OUTPUT_GRACE_MS) {
			/* something the process started holds its output open: the session ends anyway */
			for (int k = S_OUT; k <= S_ERR; k++)
				if (s->fd[k] >= 0) {
					close_output(s, k);
					enqueue(F_EOF, k, s->id, NULL, 0);
				}
		}
		if (s->exited && s->fd[S_OUT] < 0 && s->fd[S_ERR] < 0) {
			if (WIFSIGNALED(s->status))
				session_report(s->id, "signal %d", WTERMSIG(s->status));
			else
				session_report(s->id, "exit %d", WEXITSTATUS(s->status));
			drop(i);
			continue;
		}
		i++;
	}
}

void channel_attach(int fd)
{
	if (fd < 0 || chan >= 0)
		return;
	step("the host joined the channel");
	chan = fd;
	inlen = qlen = qoff = 0;
}

int channel_pollfds(struct pollfd *fds, int max)
{
	int n = 0;
	if (chan < 0 || max < 1)
		return 0;
	settle();
	if (chan < 0)
		return 0;
	fds[n++] = (struct pollfd){.fd = chan, .events = POLLIN | (qlen > qoff ? POLLOUT : 0)};
	for (size_t i = 0; i < nsessions && n + 3 <= max; i++) {
		struct session *s = sessions[i];
		for (int k = S_OUT; k <= S_ERR; k++)
			if (s->fd[k] >= 0 && s->window[k] > 0 && qlen - qoff < QUEUE_HIGH)
				fds[n++] = (struct pollfd){.fd = s->fd[k], .events = POLLIN};
		if (s->in >= 0 && s->len > s->off)
			fds[n++] = (struct pollfd){.fd = s->in, .events = POLLOUT};
	}
	return n;
}

void channel_events(struct pollfd *fds, int n)
{
	for (int i = 0; i < n && chan >= 0; i++) {
		if (!fds[i].revents)
			continue;
		int fd = fds[i].fd;
		if (fd == chan) {
			if (fds[i].revents & POLLOUT)
				write_channel();
			if (chan >= 0 && (fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
				read_channel();
			continue;
		}
		for (size_t j = 0; j < nsessions; j++) {
			struct session *s = sessions[j];
			if (fd == s->in && (fds[i].events & POLLOUT) && s->len > s->off) {
				write_input(s);
				break;
			}
			if (fd == s->fd[S_OUT] && (fds[i].events & POLLIN)) {
				read_output(s, S_OUT);
				break;
			}
			if (fd == s->fd[S_ERR] && (fds[i].events & POLLIN)) {
				read_output(s, S_ERR);
				break;
			}
		}
	}
	if (chan >= 0)
		settle();
}

int channel_reaped(pid_t pid, int status)
{
	for (size_t i = 0; i < nsessions; i++)
		if (sessions[i]->pid == pid && !sessions[i]->exited) {
			sessions[i]->exited = 1;
			sessions[i]->status = status;
			sessions[i]->exited_ms = uptime_ms();
			return 1;
		}
	return 0;
}

int channel_idle(void)
{
	return chan < 0 || (nsessions == 0 && qlen == qoff);
}

void channel_stop(void)
{
	for (size_t i = 0; i < nsessions; i++)
		kill(sessions[i]->pid, SIGKILL);
}
