/* SPDX-License-Identifier: MIT */
/*
 * The native tests' shared helpers (helpers.h): checks, random numbers,
 * temporary files, and a guest's I/O through the simulator against a model
 * of the disk.  Apart from the tests so that each holds only its scenarios.
 */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <linux/ublk_cmd.h>

#include "tests/helpers.h"

void t_die(const char *file, int line, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

uint64_t t_rnd(uint64_t n)
{
	return (uint64_t)random() % n;
}

void t_fill_random(unsigned char *buf, size_t len)
{
	for (size_t b = 0; b < len; b++)
		buf[b] = (unsigned char)random();
}

const char *t_tmpdir(void)
{
	const char *dir = getenv("TMPDIR");

	return dir ? dir : "/tmp";
}

int t_create_file(char path[T_PATH_MAX], const char *name, uint64_t size)
{
	int fd;

	snprintf(path, T_PATH_MAX, "%s/%s-XXXXXX", t_tmpdir(), name);
	fd = mkstemp(path);
	CHECK(fd >= 0, "mkstemp %s: %m", path);
	CHECK(ftruncate(fd, (off_t)size) == 0, "ftruncate %s: %m", path);
	return fd;
}

unsigned char *t_read_file(const char *path, uint64_t size)
{
	unsigned char *data = malloc(size);
	int fd = open(path, O_RDONLY);

	CHECK(data, "out of memory");
	CHECK(fd >= 0, "open %s: %m", path);
	CHECK(pread(fd, data, size, 0) == (ssize_t)size, "pread %s", path);
	close(fd);
	return data;
}

void t_check_file(const char *path, const unsigned char *model, uint64_t size,
		  const char *what)
{
	unsigned char *disk = t_read_file(path, size);

	if (memcmp(disk, model, size) != 0) {
		uint64_t i = 0;

		while (disk[i] == model[i])
			i++;
		CHECK(0, "%s differs from the model at byte %llu", what, (unsigned long long)i);
	}
	free(disk);
}

void t_guest_init(struct t_guest *g, struct ubm_sim *sim, unsigned char *model, uint64_t size,
		  int depth)
{
	CHECK(depth > 0 && depth <= T_DEPTH_MAX, "depth %d", depth);
	memset(g, 0, sizeof(*g));
	g->sim = sim;
	g->model = model;
	g->size = size;
	g->depth = depth;
}

bool t_guest_overlaps(const struct t_guest *g, uint64_t off, uint32_t len)
{
	for (int k = 0; k < g->depth; k++) {
		const struct t_slot *s = &g->slots[k];

		if (s->used && off < s->off + s->len && s->off < off + len)
			return true;
	}
	return false;
}

int t_guest_submit(struct t_guest *g, uint32_t op, uint32_t flags, uint64_t off, uint32_t len)
{
	unsigned char *buf;
	int t;

	if (op == UBLK_IO_OP_FLUSH)
		off = len = 0;
	buf = malloc(len ? len : 1);
	CHECK(buf, "out of memory");
	if (op == UBLK_IO_OP_WRITE)
		t_fill_random(buf, len);
	t = ubm_sim_submit(g->sim, op, flags, off, len, buf);
	CHECK(t >= 0 && t < g->depth, "submit: %d %s", t, ubm_last_error());
	CHECK(!g->slots[t].used, "ticket reused while in flight");
	g->slots[t] = (struct t_slot){ 1, op, off, len, buf };
	if (op == UBLK_IO_OP_WRITE)
		memcpy(g->model + off, buf, len);
	else if (op == UBLK_IO_OP_DISCARD || op == UBLK_IO_OP_WRITE_ZEROES)
		memset(g->model + off, 0, len);
	g->inflight++;
	return t;
}

void t_guest_reap(struct t_guest *g)
{
	struct t_slot *s;
	int t, res;

	CHECK(ubm_sim_wait(g->sim, &t, &res) == 0, "wait");
	CHECK(t >= 0 && t < g->depth, "completion of ticket %d", t);
	s = &g->slots[t];
	CHECK(s->used, "completion of an idle ticket");
	CHECK(res == (int)s->len, "op %u at %llu len %u: result %d", s->op,
	      (unsigned long long)s->off, s->len, res);
	if (s->op == UBLK_IO_OP_READ)
		CHECK(memcmp(s->buf, g->model + s->off, s->len) == 0,
		      "read at %llu len %u differs from the model",
		      (unsigned long long)s->off, s->len);
	free(s->buf);
	s->used = 0;
	g->inflight--;
}

void t_guest_drain(struct t_guest *g)
{
	while (g->inflight)
		t_guest_reap(g);
}
