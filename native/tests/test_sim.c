/* SPDX-License-Identifier: MIT */
/*
 * Native test of the request path: random concurrent reads, writes (some
 * FUA), flushes, discards and write-zeroes through the simulator against an
 * in-memory model of the disk.  Built with ASan/UBSan by `make test`.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <linux/ublk_cmd.h>

#include "tests/helpers.h"
#include "ubm.h"

#define SIZE (8u << 20)
#define BS 4096u
#define DEPTH 16
#define OPS 20000

int main(void)
{
	char path[T_PATH_MAX];
	unsigned char *model, buf[512];
	struct t_guest g;
	struct ubm_sim *sim;
	struct ubm_stats st;
	int ret, i;

	srandom(42);
	close(t_create_file(path, "ubm-test", SIZE));
	model = calloc(1, SIZE);
	ret = ubm_sim_create(path, 512, 0, DEPTH, &sim);
	CHECK(ret == 0, "sim_create: %d %s", ret, ubm_last_error());
	CHECK(ubm_sim_size(sim) == SIZE, "size");
	t_guest_init(&g, sim, model, SIZE, DEPTH);

	for (i = 0; i < OPS || g.inflight; i++) {
		if (i < OPS && g.inflight < DEPTH && t_rnd(3)) {
			/* requests in flight together never overlap: the block
			 * layer orders overlapping writes itself */
			uint32_t kinds[] = { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE,
					     UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES };
			uint32_t op = kinds[t_rnd(6)], flags = 0;
			uint64_t off = t_rnd(SIZE / BS) * BS;
			uint32_t len = (uint32_t)(1 + t_rnd(32)) * 512;

			if (off + len > SIZE)
				len = (uint32_t)(SIZE - off);
			if (t_guest_overlaps(&g, off, len))
				continue;
			if (op == UBLK_IO_OP_WRITE && t_rnd(4) == 0)
				flags |= UBLK_IO_F_FUA;
			if (op == UBLK_IO_OP_WRITE_ZEROES && t_rnd(2))
				flags |= UBLK_IO_F_NOUNMAP;
			t_guest_submit(&g, op, flags, off, len);
		} else if (g.inflight) {
			t_guest_reap(&g);
		}
	}
	/* whole-disk check through the file itself */
	t_check_file(path, model, SIZE, "the file");

	/* bad requests are refused, not executed */
	CHECK(ubm_sim_submit(sim, UBLK_IO_OP_READ, 0, SIZE, 512, buf) == -EINVAL, "past the end");
	CHECK(ubm_sim_submit(sim, UBLK_IO_OP_READ, 0, 100, 512, buf) == -EINVAL, "misaligned");

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
	free(model);
	return 0;
}
