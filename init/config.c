/* The MVMC_* parameters: decoding, the boot configuration, and process specs (PROTOCOL.md). */
#include "init.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct config cfg;

struct param {
	char *name;
	char *value; /* still percent-encoded */
};

struct params {
	struct param *items;
	size_t n;
};

struct params *params_new(void)
{
	return need(calloc(1, sizeof(struct params)));
}

void params_set(struct params *p, const char *entry, size_t len)
{
	const char *eq = memchr(entry, '=', len);
	size_t namelen = eq - entry;
	char *value = need(strndup(eq + 1, len - namelen - 1));
	for (size_t i = 0; i < p->n; i++)
		if (strlen(p->items[i].name) == namelen && !strncmp(p->items[i].name, entry, namelen)) {
			free(p->items[i].value);
			p->items[i].value = value;
			return;
		}
	p->items = need(realloc(p->items, (p->n + 1) * sizeof *p->items));
	p->items[p->n].name = need(strndup(entry, namelen));
	p->items[p->n++].value = value;
}

const char *params_get(const struct params *p, const char *name)
{
	for (size_t i = 0; i < p->n; i++)
		if (strcmp(p->items[i].name, name) == 0)
			return p->items[i].value;
	return NULL;
}

void params_free(struct params *p)
{
	for (size_t i = 0; i < p->n; i++) {
		free(p->items[i].name);
		free(p->items[i].value);
	}
	free(p->items);
	free(p);
}

static const char *get_named(const struct params *p, const char *prefix, const char *name)
{
	char full[64];
	snprintf(full, sizeof full, "%s%s", prefix, name);
	return params_get(p, full);
}

static const char *get_indexed(const struct params *p, const char *prefix, const char *kind, size_t n)
{
	char name[32];
	snprintf(name, sizeof name, "%s%zu", kind, n);
	return get_named(p, prefix, name);
}

static int hex(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Decodes len bytes of a %XX-encoded value, or NULL if it holds a NUL byte. */
static char *try_decode(const char *s, size_t len)
{
	char *out = need(malloc(len + 1)), *o = out;
	for (size_t i = 0; i < len; i++) {
		int hi, lo;
		if (s[i] == '%' && i + 2 < len && (hi = hex(s[i + 1])) >= 0 && (lo = hex(s[i + 2])) >= 0) {
			*o = (char)(hi << 4 | lo);
			i += 2;
		} else {
			*o = s[i];
		}
		if (*o++ == '\0') {
			free(out);
			return NULL;
		}
	}
	*o = '\0';
	return out;
}

char *decode(const char *s, size_t len, const char *what)
{
	char *out = try_decode(s, len);
	if (!out)
		fail("config", 0, "%s contains a NUL byte", what);
	return out;
}

/* ---------------------------------------------------------------- process specs */

static const struct {
	const char *name;
	int resource;
} rlimit_names[] = {
	{"AS", RLIMIT_AS},         {"CORE", RLIMIT_CORE},         {"CPU", RLIMIT_CPU},
	{"DATA", RLIMIT_DATA},     {"FSIZE", RLIMIT_FSIZE},       {"LOCKS", RLIMIT_LOCKS},
	{"MEMLOCK", RLIMIT_MEMLOCK}, {"MSGQUEUE", RLIMIT_MSGQUEUE}, {"NICE", RLIMIT_NICE},
	{"NOFILE", RLIMIT_NOFILE}, {"NPROC", RLIMIT_NPROC},       {"RSS", RLIMIT_RSS},
	{"RTPRIO", RLIMIT_RTPRIO}, {"RTTIME", RLIMIT_RTTIME},     {"SIGPENDING", RLIMIT_SIGPENDING},
	{"STACK", RLIMIT_STACK},
};

/* A decimal number up to max, the whole of [s, end); "inf" when inf_ok. */
static int parse_number(const char *s, const char *end, unsigned long long max, int inf_ok,
			unsigned long long *out)
{
	if (inf_ok && end - s == 3 && !strncmp(s, "inf", 3)) {
		*out = RLIM_INFINITY;
		return 0;
	}
	if (s == end || end - s > 20)
		return -1;
	unsigned long long v = 0;
	for (const char *c = s; c < end; c++) {
		if (*c < '0' || *c > '9')
			return -1;
		if (v > (ULLONG_MAX - (*c - '0')) / 10)
			return -1;
		v = v * 10 + (*c - '0');
	}
	if (v > max)
		return -1;
	*out = v;
	return 0;
}

/* Splits s at ':' into at most n fields; returns how many. */
static size_t split(const char *s, const char **starts, const char **ends, size_t n)
{
	size_t count = 0;
	for (;;) {
		const char *colon = strchr(s, ':');
		if (count == n)
			return n + 1;
		starts[count] = s;
		ends[count++] = colon ? colon : s + strlen(s);
		if (!colon)
			return count;
		s = colon + 1;
	}
}

static const char *parse_user(const char *raw, struct procspec *spec)
{
	const char *s[3], *e[3];
	unsigned long long uid, gid, g;
	if (split(raw, s, e, 3) != 3 || parse_number(s[0], e[0], UINT_MAX - 1, 0, &uid) ||
	    parse_number(s[1], e[1], UINT_MAX - 1, 0, &gid))
		return "USER is not uid:gid:groups";
	spec->has_user = 1;
	spec->uid = uid;
	spec->gid = gid;
	for (const char *p = s[2]; p < e[2];) {
		const char *comma = memchr(p, ',', e[2] - p);
		const char *end = comma ? comma : e[2];
		if (parse_number(p, end, UINT_MAX - 1, 0, &g) || spec->ngroups >= 65536)
			return "USER has a bad supplementary group";
		spec->groups = need(realloc(spec->groups, (spec->ngroups + 1) * sizeof *spec->groups));
		spec->groups[spec->ngroups++] = g;
		p = comma ? comma + 1 : end;
	}
	return NULL;
}

static const char *parse_limit(const char *raw, struct limit *limit)
{
	const char *s[3], *e[3];
	unsigned long long soft, hard;
	if (split(raw, s, e, 3) != 3)
		return "R<n> is not NAME:soft:hard";
	size_t i;
	for (i = 0; i < sizeof rlimit_names / sizeof *rlimit_names; i++)
		if ((size_t)(e[0] - s[0]) == strlen(rlimit_names[i].name) &&
		    !strncmp(s[0], rlimit_names[i].name, e[0] - s[0]))
			break;
	if (i == sizeof rlimit_names / sizeof *rlimit_names)
		return "R<n> names an unknown resource";
	if (parse_number(s[1], e[1], ULLONG_MAX, 1, &soft) || parse_number(s[2], e[2], ULLONG_MAX, 1, &hard))
		return "R<n> has a bad limit";
	limit->resource = rlimit_names[i].resource;
	limit->value.rlim_cur = soft;
	limit->value.rlim_max = hard;
	return NULL;
}

/* A contiguous <kind>0, 1, ... list, decoded, NULL-terminated; env entries split at the raw '='. */
static const char *decode_list(const struct params *p, const char *prefix, const char *kind, char ***out,
			       size_t *count)
{
	size_t n = 0;
	while (get_indexed(p, prefix, kind, n))
		n++;
	char **list = need(calloc(n + 1, sizeof *list));
	*out = list;
	*count = n;
	for (size_t i = 0; i < n; i++) {
		const char *raw = get_indexed(p, prefix, kind, i);
		if (strcmp(kind, "E") == 0) {
			const char *eq = strchr(raw, '=');
			if (!eq)
				return "an environment entry has no '='";
			char *name = try_decode(raw, eq - raw), *value = try_decode(eq + 1, strlen(eq + 1));
			if (name && value && asprintf(&list[i], "%s=%s", name, value) < 0)
				need(NULL);
			free(name);
			free(value);
			if (!list[i])
				return "an environment entry contains a NUL byte";
		} else if (!(list[i] = try_decode(raw, strlen(raw)))) {
			return "an argument contains a NUL byte";
		}
	}
	return NULL;
}

void procspec_free(struct procspec *spec)
{
	if (!spec)
		return;
	for (char **a = spec->argv; a && *a; a++)
		free(*a);
	for (char **e = spec->envp; e && *e; e++)
		free(*e);
	free(spec->argv);
	free(spec->envp);
	free(spec->cwd);
	free(spec->groups);
	free(spec->limits);
	free(spec);
}

struct procspec *procspec_parse(const struct params *p, const char *prefix, const char **error)
{
	struct procspec *spec = need(calloc(1, sizeof *spec));
	size_t argc, envc;
	const char *raw;
	if ((*error = decode_list(p, prefix, "A", &spec->argv, &argc)))
		goto bad;
	if (argc == 0) {
		*error = "no program: A0 is missing";
		goto bad;
	}
	if ((*error = decode_list(p, prefix, "E", &spec->envp, &envc)))
		goto bad;
	raw = get_named(p, prefix, "CWD");
	if (!(spec->cwd = try_decode(raw ? raw : "/", strlen(raw ? raw : "/")))) {
		*error = "CWD contains a NUL byte";
		goto bad;
	}
	if ((raw = get_named(p, prefix, "USER")) && (*error = parse_user(raw, spec)))
		goto bad;
	for (size_t i = 0; (raw = get_indexed(p, prefix, "R", i)); i++) {
		spec->limits = need(realloc(spec->limits, (i + 1) * sizeof *spec->limits));
		if ((*error = parse_limit(raw, &spec->limits[i])))
			goto bad;
		spec->nlimits = i + 1;
	}
	if ((raw = get_named(p, prefix, "TTY")) && strcmp(raw, "1") == 0) {
		spec->tty = 1; /* its size comes with the host's first `resize` */
	} else if (raw) {
		const char *s[2], *e[2];
		unsigned long long rows, cols;
		if (split(raw, s, e, 2) != 2 || parse_number(s[0], e[0], 65535, 0, &rows) ||
		    parse_number(s[1], e[1], 65535, 0, &cols)) {
			*error = "TTY is not rows:cols";
			goto bad;
		}
		spec->tty = 1;
		spec->rows = rows;
		spec->cols = cols;
	}
	return spec;
bad:
	procspec_free(spec);
	return NULL;
}

/* ---------------------------------------------------------------- the boot configuration */

/* Splits "fs:tag:mode[:path]" at its raw ':' separators, then decodes each field. */
static void parse_fsspec(const char *name, const char *raw, int nfields, struct fsspec *spec)
{
	char **fields[] = {&spec->fs, &spec->tag, &spec->mode, &spec->path};
	for (int i = 0; i < nfields; i++) {
		const char *end = i == nfields - 1 ? raw + strlen(raw) : strchr(raw, ':');
		if (!end)
			fail("config", 0, "%s=%s: expected %d fields separated by ':'", name, raw, nfields);
		*fields[i] = decode(raw, end - raw, name);
		raw = end + 1;
	}
	if (strcmp(spec->fs, "virtiofs") != 0 && strcmp(spec->fs, "9p") != 0)
		fail("config", 0, "%s: unknown filesystem %s", name, spec->fs);
	if (strcmp(spec->mode, "ro") != 0 && strcmp(spec->mode, "rw") != 0 &&
	    (nfields == 4 || (strcmp(spec->mode, "overlay") != 0 && strcmp(spec->mode, "overlay-ro") != 0)))
		fail("config", 0, "%s: unknown mode %s", name, spec->mode);
	if (nfields == 4 && spec->path[0] != '/')
		fail("config", 0, "%s: guest path %s is not absolute", name, spec->path);
}

/* "kind:enc(a):enc(b)" with kind bind-ro, bind-rw, tmpfs, tmpfs-ro or detach. */
static void parse_mountop(const char *name, const char *raw, struct mountop *op)
{
	static const struct {
		const char *name;
		enum mountop_kind kind;
		int readonly;
	} kinds[] = {{"bind-ro", OP_BIND, 1}, {"bind-rw", OP_BIND, 0}, {"tmpfs", OP_TMPFS, 0},
		     {"tmpfs-ro", OP_TMPFS, 1}, {"detach", OP_DETACH, 0}};
	const char *s[3], *e[3];
	size_t i;
	if (split(raw, s, e, 3) != 3)
		fail("config", 0, "%s=%s: expected kind:a:b", name, raw);
	for (i = 0; i < sizeof kinds / sizeof *kinds; i++)
		if ((size_t)(e[0] - s[0]) == strlen(kinds[i].name) && !strncmp(s[0], kinds[i].name, e[0] - s[0]))
			break;
	if (i == sizeof kinds / sizeof *kinds)
		fail("config", 0, "%s=%s: unknown mount kind", name, raw);
	op->kind = kinds[i].kind;
	op->readonly = kinds[i].readonly;
	op->a = decode(s[1], e[1] - s[1], name);
	op->b = decode(s[2], e[2] - s[2], name);
	if (op->a[0] != '/' || (op->kind == OP_BIND && op->b[0] != '/'))
		fail("config", 0, "%s: guest path is not absolute", name);
}

void read_config(void)
{
	extern char **environ;
	struct params *p = params_new();
	const char *error, *raw;
	for (char **e = environ; *e; e++)
		if (strncmp(*e, "MVMC_", 5) == 0 && strchr(*e, '='))
			params_set(p, *e, strlen(*e));
	if (getenv("MVMC_SPILL") && strcmp(getenv("MVMC_SPILL"), "1") == 0) {
		step("read /microvmc/config");
		char *spill = read_file("/microvmc/config");
		if (!spill)
			fail("config", errno, "read /microvmc/config");
		for (char *line = strtok(spill, "\n"); line; line = strtok(NULL, "\n")) {
			if (!strchr(line, '='))
				fail("config", 0, "/microvmc/config: line without '=': %s", line);
			params_set(p, line, strlen(line));
		}
		free(spill);
	}
	if (!(cfg.program = procspec_parse(p, "MVMC_", &error)))
		fail("config", 0, "MVMC_%s", error);
	raw = params_get(p, "MVMC_HOSTNAME");
	cfg.hostname = raw ? decode(raw, strlen(raw), "MVMC_HOSTNAME") : NULL;
	raw = params_get(p, "MVMC_HOLD");
	cfg.hold = raw && strcmp(raw, "1") == 0;
	raw = params_get(p, "MVMC_NET");
	cfg.net = raw ? need(strdup(raw)) : NULL; /* decoded field by field (net.c): IPv6's ':'s are %3A */
	if (!(raw = params_get(p, "MVMC_ROOT")))
		fail("config", 0, "MVMC_ROOT is missing");
	parse_fsspec("MVMC_ROOT", raw, 3, &cfg.root);
	size_t nshares = 0;
	while (get_indexed(p, "MVMC_", "S", nshares))
		nshares++;
	cfg.shares = need(calloc(nshares + 1, sizeof *cfg.shares));
	for (size_t i = 0; i < nshares; i++) {
		char name[32];
		snprintf(name, sizeof name, "MVMC_S%zu", i);
		parse_fsspec(name, params_get(p, name), 4, &cfg.shares[i]);
	}
	cfg.nshares = nshares;
	size_t nops = 0;
	while (get_indexed(p, "MVMC_", "M", nops))
		nops++;
	cfg.ops = need(calloc(nops + 1, sizeof *cfg.ops));
	for (size_t i = 0; i < nops; i++) {
		char name[32];
		snprintf(name, sizeof name, "MVMC_M%zu", i);
		parse_mountop(name, params_get(p, name), &cfg.ops[i]);
	}
	cfg.nops = nops;
	params_free(p);
}
