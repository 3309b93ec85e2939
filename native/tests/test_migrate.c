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
#include <fcntl.h>
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
#include "ubm.h"

#define SIZE (16u << 20)
#define CHUNK (64u << 10)
#define DEPTH 16

#define CHECK(c, ...) do { if (!(c)) { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } } while (0)

static unsigned char *model;
static struct ubm_sim *sim;
static struct ubm_target *tgt;
static volatile int copier_done;
static int copier_ret;
static uint32_t mode;

struct slot { int used; uint32_t op; uint64_t off; uint32_t len; unsigned char *buf; };
static struct slot slots[DEPTH];
static int inflight;

static uint64_t rnd(uint64_t n) { return (uint64_t)random() % n; }

static void reap_one(void)
{
	int t, res;

	CHECK(ubm_sim_wait(sim, &t, &res) == 0, "wait");
	struct slot *s = &slots[t];
	CHECK(s->used, "completion of an idle ticket");
	CHECK(res == (int)s->len, "op %u at %llu len %u: result %d", s->op,
	      (unsigned long long)s->off, s->len, res);
	if (s->op == UBLK_IO_OP_READ)
		CHECK(memcmp(s->buf, model + s->off, s->len) == 0, "read at %llu differs",
		      (unsigned long long)s->off);
	free(s->buf);
	s->used = 0;
	inflight--;
}

static void guest_io(void)
{
	uint32_t kinds[] = { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE,
			     UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_OP_FLUSH };
	uint32_t op = kinds[rnd(7)];
	uint64_t off = rnd(SIZE / 4096) * 4096;
	uint32_t len = (uint32_t)(1 + rnd(64)) * 4096;  /* up to 256 KiB: spans chunks */

	if (off + len > SIZE)
		len = (uint32_t)(SIZE - off);
	for (int k = 0; k < DEPTH; k++)
		if (slots[k].used && off < slots[k].off + slots[k].len && slots[k].off < off + len)
			return;  /* the block layer never has overlapping requests in flight */
	if (op == UBLK_IO_OP_FLUSH)
		off = len = 0;
	unsigned char *buf = malloc(len ? len : 1);
	if (op == UBLK_IO_OP_WRITE)
		for (uint32_t b = 0; b < len; b++)
			buf[b] = (unsigned char)random();
	int t = ubm_sim_submit(sim, op, 0, off, len, buf);
	CHECK(t >= 0, "submit: %d %s", t, ubm_last_error());
	slots[t] = (struct slot){ 1, op, off, len, buf };
	if (op == UBLK_IO_OP_WRITE)
		memcpy(model + off, buf, len);
	else if (op == UBLK_IO_OP_DISCARD || op == UBLK_IO_OP_WRITE_ZEROES)
		memset(model + off, 0, len);
	inflight++;
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
		if (inflight < DEPTH && rnd(3))
			guest_io();
		else if (inflight)
			reap_one();
		else
			ubm_sim_poll(sim);
	}
	pthread_join(th, NULL);
	CHECK(copier_ret == 0, "copier: %d %s", copier_ret, ubm_last_error());
}

static void check_file(const char *path, const char *what)
{
	unsigned char *disk = malloc(SIZE);
	int fd = open(path, O_RDONLY);

	CHECK(pread(fd, disk, SIZE, 0) == SIZE, "pread");
	close(fd);
	for (uint64_t i = 0; i < SIZE; i++)
		CHECK(disk[i] == model[i], "%s differs from the model at byte %llu", what,
		      (unsigned long long)i);
	free(disk);
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

/* The destination: a file, or with nbd that file exported by nbdkit over a
 * unix socket (the NBD backend under ASan). */
static void run(const char *dir, uint32_t m, int zeroed, int cancel, int nbd)
{
	char src[4096], dst[4096], sock[4200], uri[4300];
	struct ubm_mig_stats st;
	pid_t server = 0;
	int fd;

	mode = m;
	memset(slots, 0, sizeof(slots));
	inflight = 0;
	copier_done = 0;
	snprintf(src, sizeof(src), "%s/ubm-src-XXXXXX", dir);
	snprintf(dst, sizeof(dst), "%s/ubm-dst-XXXXXX", dir);
	/* the source: random data, with holes */
	fd = mkstemp(src);
	CHECK(fd >= 0 && ftruncate(fd, SIZE) == 0, "source");
	memset(model, 0, SIZE);
	for (uint64_t off = 0; off < SIZE; off += 256 << 10) {
		if (rnd(3) == 0)
			continue;
		for (uint32_t b = 0; b < (128u << 10); b++)
			model[off + b] = (unsigned char)random();
		CHECK(pwrite(fd, model + off, 128 << 10, (off_t)off) == 128 << 10, "pwrite");
	}
	close(fd);
	fd = mkstemp(dst);
	CHECK(fd >= 0 && ftruncate(fd, SIZE) == 0, "dest");
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
		while (inflight)
			reap_one();
		CHECK(ubm_mig_finish(tgt) == 0, "cancel: %s", ubm_last_error());
		for (int i = 0; i < 300; i++) {  /* the source serves on */
			if (inflight < DEPTH)
				guest_io();
			else
				reap_one();
		}
		while (inflight)
			reap_one();
		ubm_sim_destroy(sim);
		check_file(src, "the source after a cancel");
		printf("test_migrate: %s cancelled: the source equals the model\n", mode_name(m));
		unlink(src);
		unlink(dst);
		return;
	}
	/* bring it into sync */
	for (int tries = 0;; tries++) {
		uint64_t n;
		int ret;

		/* pause with guest requests in flight (they complete first) and
		 * more submitted: those park until the resume */
		for (int k = 0; k < DEPTH / 2 && inflight < DEPTH; k++)
			guest_io();
		CHECK(ubm_mig_pause(tgt) == 0, "pause");
		for (int k = 0; k < 4 && inflight < DEPTH; k++)
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
	CHECK(ubm_mig_get_stats(tgt, &st) == 0, "stats");
	CHECK(st.cut_over && st.dirty_chunks == 0 && st.chunks_copied == st.nr_chunks,
	      "in sync after cutover");
	CHECK(ubm_mig_resume(tgt) == 0, "resume");
	printf("test_migrate: %s%s: %llu passes, %llu bytes copied, %llu skipped, %llu mirrored, "
	       "%llu tracked, %llu parked, %llu COW, %llu matched: ", mode_name(m),
	       zeroed ? "" : " (old data on the destination)", (unsigned long long)st.passes,
	       (unsigned long long)st.bytes_copied, (unsigned long long)st.bytes_skipped,
	       (unsigned long long)st.mirrored_writes, (unsigned long long)st.tracked_writes,
	       (unsigned long long)st.parked, (unsigned long long)st.cow_chunks,
	       (unsigned long long)st.bytes_matched);
	/* guest I/O after the cutover goes to the destination */
	for (int i = 0; i < 500; i++) {
		if (inflight < DEPTH)
			guest_io();
		else
			reap_one();
	}
	while (inflight)
		reap_one();
	CHECK(ubm_mig_finish(tgt) == 0, "finish");
	for (int i = 0; i < 200; i++) {
		if (inflight < DEPTH)
			guest_io();
		else
			reap_one();
	}
	while (inflight)
		reap_one();
	ubm_sim_destroy(sim);
	if (server) {
		kill(server, SIGTERM);
		waitpid(server, NULL, 0);
		unlink(sock);
	}
	check_file(dst, "the destination");
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
static void copier_waits_for_inflight_writes(const char *dir, int before_start)
{
	char src[4096], dst[4096];
	unsigned char *buf = malloc(CHUNK), *disk = malloc(SIZE);
	uint64_t n;
	int fd, t, res;

	snprintf(src, sizeof(src), "%s/ubm-src-XXXXXX", dir);
	snprintf(dst, sizeof(dst), "%s/ubm-dst-XXXXXX", dir);
	fd = mkstemp(src);
	CHECK(fd >= 0 && ftruncate(fd, SIZE) == 0, "source");
	close(fd);
	fd = mkstemp(dst);
	CHECK(fd >= 0 && ftruncate(fd, SIZE) == 0, "dest");
	close(fd);
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
	fd = open(dst, O_RDONLY);
	CHECK(pread(fd, disk, SIZE, 0) == SIZE, "pread");
	close(fd);
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
	const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";

	srandom(7);
	copier_waits_for_inflight_writes(dir, 0);
	copier_waits_for_inflight_writes(dir, 1);
	model = malloc(SIZE);
	for (uint32_t m = UBM_MIG_MIRROR; m <= UBM_MIG_SNAPSHOT; m++) {
		run(dir, m, 1, 0, 0);
		run(dir, m, 0, 0, 0);
		run(dir, m, 1, 1, 0);
	}
	printf("test_migrate: to an NBD export (nbdkit, unix socket)\n");
	for (uint32_t m = UBM_MIG_MIRROR; m <= UBM_MIG_SNAPSHOT; m++)
		run(dir, m, 0, 0, 1);
	/* the destination and deltas as plain fds, as on kernels before 6.13
	 * (the runs above used what this kernel picks) */
	ubm_fixed_migration_files = 0;
	printf("test_migrate: again, the destination and deltas as plain fds\n");
	for (uint32_t m = UBM_MIG_MIRROR; m <= UBM_MIG_SNAPSHOT; m++)
		run(dir, m, 0, 0, 0);
	free(model);
	return 0;
}
