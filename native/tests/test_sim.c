/* SPDX-License-Identifier: MIT */
/*
 * Native test of the request path: random concurrent reads, writes (some
 * FUA), flushes, discards and write-zeroes through the simulator against an
 * in-memory model of the disk.  Built with ASan/UBSan by `make test`.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <linux/ublk_cmd.h>

#include "ubm.h"

#define SIZE (8u << 20)
#define BS 4096u
#define DEPTH 16
#define OPS 20000

static unsigned char *model;

struct slot {
	int used;
	uint32_t op;
	uint64_t off;
	uint32_t len;
	unsigned char *buf;
};

#define CHECK(c, ...) do { if (!(c)) { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } } while (0)

static uint64_t rnd(uint64_t n) { return (uint64_t)random() % n; }

int main(void)
{
	const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
	char path[4096];
	struct slot slots[DEPTH] = { 0 };
	struct ubm_sim *sim;
	struct ubm_stats st;
	int fd, ret, i, inflight = 0;

	srandom(42);
	snprintf(path, sizeof(path), "%s/ubm-test-XXXXXX", dir);
	fd = mkstemp(path);
	CHECK(fd >= 0, "mkstemp");
	CHECK(ftruncate(fd, SIZE) == 0, "ftruncate");
	close(fd);
	model = calloc(1, SIZE);
	ret = ubm_sim_create(path, 512, 0, DEPTH, &sim);
	CHECK(ret == 0, "sim_create: %d %s", ret, ubm_last_error());
	CHECK(ubm_sim_size(sim) == SIZE, "size");

	for (i = 0; i < OPS || inflight; i++) {
		if (i < OPS && inflight < DEPTH && rnd(3)) {
			/* requests in flight together never overlap: the block
			 * layer orders overlapping writes itself */
			uint32_t kinds[] = { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE,
					     UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES };
			uint32_t op = kinds[rnd(6)], flags = 0;
			uint64_t off = rnd(SIZE / BS) * BS;
			uint32_t len = (uint32_t)(1 + rnd(32)) * 512;
			int t, k, clash = 0;

			if (off + len > SIZE)
				len = (uint32_t)(SIZE - off);
			for (k = 0; k < DEPTH; k++)
				if (slots[k].used && off < slots[k].off + slots[k].len &&
				    slots[k].off < off + len)
					clash = 1;
			if (clash)
				continue;
			if (op == UBLK_IO_OP_FLUSH)
				off = len = 0;
			if (op == UBLK_IO_OP_WRITE && rnd(4) == 0)
				flags |= UBLK_IO_F_FUA;
			if (op == UBLK_IO_OP_WRITE_ZEROES && rnd(2))
				flags |= UBLK_IO_F_NOUNMAP;
			unsigned char *buf = malloc(len ? len : 1);
			if (op == UBLK_IO_OP_WRITE)
				for (uint32_t b = 0; b < len; b++)
					buf[b] = (unsigned char)random();
			t = ubm_sim_submit(sim, op, flags, off, len, buf);
			CHECK(t >= 0 && t < DEPTH, "submit: %d %s", t, ubm_last_error());
			CHECK(!slots[t].used, "ticket reused while in flight");
			slots[t] = (struct slot){ 1, op, off, len, buf };
			if (op == UBLK_IO_OP_WRITE)
				memcpy(model + off, buf, len);
			else if (op == UBLK_IO_OP_DISCARD || op == UBLK_IO_OP_WRITE_ZEROES)
				memset(model + off, 0, len);
			inflight++;
		} else if (inflight) {
			int t, res;

			CHECK(ubm_sim_wait(sim, &t, &res) == 0, "wait");
			struct slot *s = &slots[t];
			CHECK(s->used, "completion of an idle ticket");
			CHECK(res == (int)s->len, "op %u at %llu len %u: result %d", s->op,
			      (unsigned long long)s->off, s->len, res);
			if (s->op == UBLK_IO_OP_READ)
				CHECK(memcmp(s->buf, model + s->off, s->len) == 0,
				      "read at %llu len %u differs from the model",
				      (unsigned long long)s->off, s->len);
			free(s->buf);
			s->used = 0;
			inflight--;
		}
	}
	/* whole-disk check through the file itself */
	unsigned char *disk = malloc(SIZE);
	fd = open(path, O_RDONLY);
	CHECK(pread(fd, disk, SIZE, 0) == SIZE, "pread");
	CHECK(memcmp(disk, model, SIZE) == 0, "file differs from the model");
	close(fd);

	/* bad requests are refused, not executed */
	CHECK(ubm_sim_submit(sim, UBLK_IO_OP_READ, 0, SIZE, 512, disk) == -EINVAL, "past the end");
	CHECK(ubm_sim_submit(sim, UBLK_IO_OP_READ, 0, 100, 512, disk) == -EINVAL, "misaligned");

	ubm_sim_stats(sim, &st);
	CHECK(st.errors == 0 && st.inflight == 0, "stats: errors %llu inflight %llu",
	      (unsigned long long)st.errors, (unsigned long long)st.inflight);
	CHECK(st.reads && st.writes && st.flushes && st.discards && st.write_zeroes && st.fua_writes,
	      "every kind of request was counted");
	printf("test_sim: %llu reads, %llu writes (%llu FUA), %llu flushes, %llu discards, "
	       "%llu write-zeroes: ok\n", (unsigned long long)st.reads,
	       (unsigned long long)st.writes, (unsigned long long)st.fua_writes,
	       (unsigned long long)st.flushes, (unsigned long long)st.discards,
	       (unsigned long long)st.write_zeroes);
	ubm_sim_destroy(sim);
	unlink(path);
	free(disk);
	free(model);
	return 0;
}
