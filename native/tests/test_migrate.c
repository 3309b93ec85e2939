/* SPDX-License-Identifier: MIT */
/*
 * Native test of live migration through the simulator: a guest thread
 * writes, discards and reads at random while another thread runs copy
 * passes; after the cutover the destination must equal the model of the
 * disk byte for byte, and later I/O must go to the destination.  Run for
 * every mode under ASan/UBSan by `make test`, to a file and to a file that
 * nbdkit exports over a unix socket (the NBD backend).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/ublk_cmd.h>

#include "migrate/migrate.h"  /* ubm_fixed_migration_files */
#include "tests/helpers.h"
#include "ubm.h"

#define SIZE (16u << 20)
#define CHUNK (64u << 10)
#define DEPTH 16

static unsigned char *model;
static struct ubm_sim *sim;
static struct ubm_target *tgt;
static volatile int copier_done;
static int copier_ret;
static uint32_t mode;
static struct t_guest guest;  /* on sim, against model */

static void guest_io(void)
{
	uint32_t kinds[] = { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE,
			     UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_OP_FLUSH };
	uint32_t op = kinds[t_rnd(7)];
	uint64_t off = t_rnd(SIZE / 4096) * 4096;
	uint32_t len = (uint32_t)(1 + t_rnd(64)) * 4096;  /* up to 256 KiB: spans chunks */

	if (off + len > SIZE)
		len = (uint32_t)(SIZE - off);
	if (t_guest_overlaps(&guest, off, len))
		return;  /* the block layer never has overlapping requests in flight */
	t_guest_submit(&guest, op, 0, off, len);
}

/* n rounds of guest I/O (each a new request, or a completion when the queue
 * is full), then every request completes. */
static void guest_io_rounds(int n)
{
	for (int i = 0; i < n; i++) {
		if (guest.inflight < DEPTH)
			guest_io();
		else
			t_guest_reap(&guest);
	}
	t_guest_drain(&guest);
}

static void *copier(void *arg)
{
	uint64_t n;
	int ret;

	(void)arg;
	ret = ubm_mig_copy_pass(tgt, UBM_PASS_ALL, &n);
	/* (snapshot: the driver thread switches deltas between passes) */
	for (int pass = 0; ret == 0 && mode == UBM_MIG_DBT && pass < 3; pass++)
		ret = ubm_mig_copy_pass(tgt, UBM_PASS_DIRTY, &n);
	copier_ret = ret;
	__atomic_store_n(&copier_done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static const char *mode_name(uint32_t m)
{
	return m == UBM_MIG_MIRROR ? "mirror" : m == UBM_MIG_DBT ? "dbt" : "snapshot";
}

/* Guest I/O while a copier thread runs its passes. */
static void copy_with_guest_io(void)
{
	pthread_t th;

	copier_done = 0;
	CHECK(pthread_create(&th, NULL, copier, NULL) == 0, "thread");
	while (!__atomic_load_n(&copier_done, __ATOMIC_SEQ_CST)) {
		if (guest.inflight < DEPTH && t_rnd(3))
			guest_io();
		else if (guest.inflight)
			t_guest_reap(&guest);
		else
			ubm_sim_poll(sim);
	}
	pthread_join(th, NULL);
	CHECK(copier_ret == 0, "copier: %d %s", copier_ret, ubm_last_error());
}

extern char **environ;

/* nbdkit exporting `file` on the unix socket `sock` (0 if nbdkit is missing) */
static pid_t start_nbdkit(const char *file, const char *sock)
{
	char *argv[] = { "nbdkit", "-f", "-U", (char *)sock, "file", (char *)file, NULL };
	pid_t pid;

	if (posix_spawnp(&pid, "nbdkit", NULL, NULL, argv, environ) != 0)
		return 0;
	for (int i = 0; i < 400 && access(sock, F_OK) != 0; i++)
		usleep(25000);
	CHECK(access(sock, F_OK) == 0, "nbdkit did not start");
	return pid;
}

/* The final pass with guest I/O paused, verify, and the cutover (paused). */
static void paused_cutover(void)
{
	for (int tries = 0;; tries++) {
		uint64_t n;
		int ret;

		/* pause with guest requests in flight (they complete first) and
		 * more submitted: those park until the resume */
		for (int k = 0; k < DEPTH / 2 && guest.inflight < DEPTH; k++)
			guest_io();
		CHECK(ubm_mig_pause(tgt) == 0, "pause");
		for (int k = 0; k < 4 && guest.inflight < DEPTH; k++)
			guest_io();
		CHECK(ubm_mig_copy_pass(tgt, UBM_PASS_FINAL, &n) == 0, "final: %s", ubm_last_error());
		uint64_t bad;
		CHECK(ubm_mig_verify(tgt, &bad) == 0 && bad == 0, "verify: %llu chunks differ",
		      (unsigned long long)bad);
		ret = ubm_mig_cutover(tgt);
		if (ret == 0)
			break;
		CHECK(ret == -EAGAIN && tries < 5, "cutover: %d %s", ret, ubm_last_error());
		CHECK(ubm_mig_resume(tgt) == 0, "resume");
	}
}

/*
 * The tail of dbt and snapshot as the control plane runs it: the writes
 * mirrored (snapshot: to the active delta and the destination), passes with
 * the guest going on, and the cutover made with guest requests in flight, no
 * pause.  Mirroring stops once midway and starts again: the writes meanwhile
 * (to chunks the tail copied already) must go dirty.
 */
static void tail(uint32_t m)
{
	uint32_t saved = mode;

	CHECK(ubm_mig_set_mode(tgt, UBM_MIG_MIRROR) == 0, "mirror: %s", ubm_last_error());
	mode = UBM_MIG_MIRROR;  /* the copier thread: one pass */
	copy_with_guest_io();
	CHECK(ubm_mig_set_mode(tgt, m) == 0, "stop mirroring: %s", ubm_last_error());
	guest_io_rounds(200);
	CHECK(ubm_mig_set_mode(tgt, UBM_MIG_MIRROR) == 0, "mirror again: %s", ubm_last_error());
	for (int tries = 0;; tries++) {
		int ret;

		copy_with_guest_io();
		for (int k = 0; k < DEPTH / 2 && guest.inflight < DEPTH; k++)
			guest_io();  /* in flight across the cutover */
		ret = ubm_mig_cutover(tgt);
		if (ret == 0)
			break;
		CHECK(ret == -EAGAIN && tries < 5, "cutover: %d %s", ret, ubm_last_error());
	}
	mode = saved;
}

/* The destination: a file, or with nbd that file exported by nbdkit over a
 * unix socket (the NBD backend under ASan); with_tail: the cutover without a
 * pause (tail()). */
static void run(uint32_t m, int zeroed, int cancel, int nbd, int with_tail)
{
	char src[T_PATH_MAX], dst[T_PATH_MAX], sock[T_PATH_MAX + 8], uri[T_PATH_MAX + 32];
	struct ubm_mig_stats st;
	pid_t server = 0;
	int fd;

	mode = m;
	copier_done = 0;
	/* the source: random data, with holes */
	fd = t_create_file(src, "ubm-src", SIZE);
	memset(model, 0, SIZE);
	for (uint64_t off = 0; off < SIZE; off += 256 << 10) {
		if (t_rnd(3) == 0)
			continue;
		t_fill_random(model + off, 128u << 10);
		CHECK(pwrite(fd, model + off, 128 << 10, (off_t)off) == 128 << 10, "pwrite");
	}
	close(fd);
	fd = t_create_file(dst, "ubm-dst", SIZE);
	if (!zeroed) {
		/* old data on the destination must not survive: junk, but for an earlier
		 * copy of the first half (with a junk page in every 8th 64 KiB), which the
		 * migration checks (check_below) as a resumed one does */
		unsigned char junk[4096];
		memset(junk, 0xa5, sizeof(junk));
		for (uint64_t off = 0; off < SIZE; off += sizeof(junk)) {
			int stale = (off / CHUNK) % 8 == 0 && off % CHUNK == 0;
			const void *p = off < SIZE / 2 && !stale ? model + off : junk;

			CHECK(pwrite(fd, p, sizeof(junk), (off_t)off) == sizeof(junk), "junk");
		}
	}
	close(fd);
	if (nbd) {
		snprintf(sock, sizeof(sock), "%s.sock", dst);
		snprintf(uri, sizeof(uri), "nbd+unix:///?socket=%s", sock);
		server = start_nbdkit(dst, sock);
		if (!server) {
			printf("test_migrate: no nbdkit: the NBD runs are skipped\n");
			unlink(src);
			unlink(dst);
			return;
		}
	}

	CHECK(ubm_sim_create(src, 512, 0, DEPTH, &sim) == 0, "sim: %s", ubm_last_error());
	tgt = ubm_sim_target(sim);
	t_guest_init(&guest, sim, model, SIZE, DEPTH);
	struct ubm_mig_config cfg = { .dest_path = nbd ? uri : dst, .mode = m, .dest_zeroed = (uint32_t)zeroed,
				      /* snapshot: chunks no smaller than a request */
				      .chunk_size = m == UBM_MIG_SNAPSHOT ? 4 * CHUNK : CHUNK,
				      .copy_depth = 4,
				      .check_below = zeroed ? 0 : SIZE / 2 / (m == UBM_MIG_SNAPSHOT ? 4 * CHUNK : CHUNK),
				      .speed = getenv("UBM_TEST_SPEED") ? strtoull(getenv("UBM_TEST_SPEED"), NULL, 0) : 32u << 20 /* slow enough for races */ };
	CHECK(ubm_mig_start(tgt, &cfg) == 0, "mig_start: %s", ubm_last_error());
	struct ubm_mig_config again = cfg;
	CHECK(ubm_mig_start(tgt, &again) == -EBUSY, "second migration refused");
	/* slow guest writes keep them in flight while the copier works */
	CHECK(ubm_sim_set_delay(sim, 0, 1000000) == 0, "delay");  /* 1 ms */

	for (int round = 0; round < (m == UBM_MIG_SNAPSHOT ? 3 : 1); round++) {
		if (round)
			CHECK(ubm_mig_new_delta(tgt) == 0, "new delta: %s", ubm_last_error());
		copy_with_guest_io();
	}
	if (cancel) {
		t_guest_drain(&guest);
		CHECK(ubm_mig_finish(tgt) == 0, "cancel: %s", ubm_last_error());
		guest_io_rounds(300);  /* the source serves on */
		ubm_sim_destroy(sim);
		t_check_file(src, model, SIZE, "the source after a cancel");
		printf("test_migrate: %s cancelled: the source equals the model\n", mode_name(m));
		unlink(src);
		unlink(dst);
		return;
	}
	/* bring it into sync */
	if (with_tail)
		tail(m);
	else
		paused_cutover();
	CHECK(ubm_mig_get_stats(tgt, &st) == 0, "stats");
	CHECK(st.cut_over && st.dirty_chunks == 0 && st.chunks_copied == st.nr_chunks,
	      "in sync after cutover");
	CHECK(ubm_mig_resume(tgt) == 0, "resume");
	printf("test_migrate: %s%s%s: %llu passes, %llu bytes copied, %llu skipped, %llu mirrored, "
	       "%llu tracked, %llu parked, %llu COW, %llu matched: ", mode_name(m),
	       with_tail ? " (mirrored tail, no pause)" : "",
	       zeroed ? "" : " (old data on the destination)", (unsigned long long)st.passes,
	       (unsigned long long)st.bytes_copied, (unsigned long long)st.bytes_skipped,
	       (unsigned long long)st.mirrored_writes, (unsigned long long)st.tracked_writes,
	       (unsigned long long)st.parked, (unsigned long long)st.cow_chunks,
	       (unsigned long long)st.bytes_matched);
	/* guest I/O after the cutover goes to the destination */
	guest_io_rounds(500);
	CHECK(ubm_mig_finish(tgt) == 0, "finish");
	guest_io_rounds(200);
	ubm_sim_destroy(sim);
	if (server) {
		kill(server, SIGTERM);
		waitpid(server, NULL, 0);
		unlink(sock);
	}
	t_check_file(dst, model, SIZE, "the destination");
	printf("destination equals the model\n");
	unlink(src);
	unlink(dst);
}

/*
 * Directed: a write in flight on a chunk when the copier reaches it must be
 * on the destination after the pass, in dirty tracking mode (where that
 * write is not tracked: its chunk was not copied when it arrived).  Only
 * the copier's wait for in-flight writes makes this hold.
 */
static void copier_waits_for_inflight_writes(int before_start)
{
	char src[T_PATH_MAX], dst[T_PATH_MAX];
	unsigned char *buf = malloc(CHUNK), *disk;
	uint64_t n;
	int t, res;

	close(t_create_file(src, "ubm-src", SIZE));
	close(t_create_file(dst, "ubm-dst", SIZE));
	memset(buf, 0x5a, CHUNK);
	CHECK(ubm_sim_create(src, 512, 0, 4, &sim) == 0, "sim");
	tgt = ubm_sim_target(sim);
	struct ubm_mig_config cfg = { .dest_path = dst, .mode = UBM_MIG_DBT, .dest_zeroed = 1,
				      .chunk_size = CHUNK };
	CHECK(ubm_sim_set_delay(sim, 0, 200000000) == 0, "delay");  /* 200 ms */
	if (before_start) {
		/* routed before the migration existed: no chunk reference */
		t = ubm_sim_submit(sim, UBLK_IO_OP_WRITE, 0, 5 * CHUNK, CHUNK, buf);
		CHECK(t >= 0, "submit");
	}
	CHECK(ubm_mig_start(tgt, &cfg) == 0, "mig_start: %s", ubm_last_error());
	if (!before_start) {
		t = ubm_sim_submit(sim, UBLK_IO_OP_WRITE, 0, 5 * CHUNK, CHUNK, buf);
		CHECK(t >= 0, "submit");
	}
	mode = UBM_MIG_MIRROR;  /* the copier thread: one pass */
	copier_done = 0;
	pthread_t th;
	CHECK(pthread_create(&th, NULL, copier, NULL) == 0, "thread");
	CHECK(ubm_sim_wait(sim, &t, &res) == 0 && res == CHUNK, "write");
	pthread_join(th, NULL);
	CHECK(copier_ret == 0, "pass");
	CHECK(ubm_mig_pause(tgt) == 0 && ubm_mig_copy_pass(tgt, UBM_PASS_FINAL, &n) == 0, "final");
	CHECK(ubm_mig_cutover(tgt) == 0, "cutover: %s", ubm_last_error());
	CHECK(ubm_mig_finish(tgt) == 0, "finish");
	ubm_sim_destroy(sim);
	disk = t_read_file(dst, SIZE);
	CHECK(memcmp(disk + 5 * CHUNK, buf, CHUNK) == 0,
	      "a write in flight during the chunk's copy is missing on the destination");
	printf("test_migrate: the copier waited for a write in flight%s: ok\n",
	       before_start ? " since before the start" : "");
	unlink(src);
	unlink(dst);
	free(buf);
	free(disk);
}

int main(void)
{
	srandom(7);
	copier_waits_for_inflight_writes(0);
	copier_waits_for_inflight_writes(1);
	model = malloc(SIZE);
	for (uint32_t m = UBM_MIG_MIRROR; m <= UBM_MIG_SNAPSHOT; m++) {
		run(m, 1, 0, 0, 0);  /* paused, as --verify */
		run(m, 0, 0, 0, 1);  /* mirrored tail, as without it */
		run(m, 1, 1, 0, 0);
	}
	printf("test_migrate: to an NBD export (nbdkit, unix socket)\n");
	for (uint32_t m = UBM_MIG_MIRROR; m <= UBM_MIG_SNAPSHOT; m++)
		run(m, 0, 0, 1, m != UBM_MIG_MIRROR);
	/* the destination and deltas as plain fds, as on kernels before 6.13
	 * (the runs above used what this kernel picks) */
	ubm_fixed_migration_files = 0;
	printf("test_migrate: again, the destination and deltas as plain fds\n");
	for (uint32_t m = UBM_MIG_MIRROR; m <= UBM_MIG_SNAPSHOT; m++)
		run(m, 0, 0, 0, 0);
	free(model);
	return 0;
}
