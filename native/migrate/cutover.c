/* SPDX-License-Identifier: MIT */
/*
 * The cutover, and what it relies on: the destination flushed, the check that it
 * holds every byte, the hold of guest requests around the switch; verify.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "migrate/migrate.h"

/* Why the migration cannot cut over now (ubm_fail text), or 0. */
static int not_in_sync(struct ubm_migration *m)
{
	struct ubm_target *t = m->t;

	if (A_LOAD(&m->error))
		return ubm_fail(EIO, "the destination failed: %s", strerror(-A_LOAD(&m->error)));
	if (A_LOAD(&m->chunks_copied) != m->nr_chunks || A_LOAD(&m->dirty_count) ||
	    __atomic_load_n(&m->unmirrored, __ATOMIC_SEQ_CST))
		return ubm_fail(EAGAIN, "not in sync: %llu of %llu chunks copied, %llu dirty",
				(unsigned long long)A_LOAD(&m->chunks_copied),
				(unsigned long long)m->nr_chunks,
				(unsigned long long)A_LOAD(&m->dirty_count));
	/* a connection lost unnoticed (idle) would fail guest I/O after the switch */
	if (t->dest.ops->down && t->dest.ops->down(&t->dest))
		return ubm_fail(ENOTCONN, "connections to the destination are lost");
	return 0;
}

/*
 * Flush the destination.  What the destination acknowledged before the
 * flush began is durable once it succeeds: those chunks leave the unflushed
 * map (taken out first; writes acknowledged from then on go back in).  On
 * failure they stay in it.
 */
int mig_flush_dest(struct ubm_migration *m)
{
	struct ubm_backend *dest = &m->t->dest;
	uint64_t words = (m->nr_chunks + 63) / 64, *taken = calloc(words, sizeof(*taken));
	int ret;

	if (!taken)
		return -ENOMEM;
	for (uint64_t w = 0; w < words; w++)
		taken[w] = __atomic_exchange_n(&m->unflushed[w], 0, __ATOMIC_SEQ_CST);
	ret = dest->ops->sync_io(dest, UBLK_IO_OP_FLUSH, NULL, 0, 0);
	if (ret < 0) {
		for (uint64_t w = 0; w < words; w++)
			if (taken[w])
				__atomic_fetch_or(&m->unflushed[w], taken[w], __ATOMIC_SEQ_CST);
	}
	free(taken);
	return ret;
}

/*
 * The cutover, in two steps around the control plane's durable record:
 *
 *   hold    flush the destination (what the copier wrote must be durable
 *           there: the guest flushed it on the source), then hold new guest
 *           requests and let those in flight finish (mirrored writes end on
 *           both sides, each destination failure recorded), check again
 *           that the destination holds every byte;
 *   (the control plane makes the record saying the destination is the disk
 *   durable: nothing is in flight, so both sides are equal, and a daemon
 *   dying from here on leaves a successor the right image)
 *   switch  all I/O goes to the destination, then release the held requests
 *           (or, without commit, release them to the source).
 *
 * Without the hold, a mirrored write whose destination part fails while its
 * source part is still in flight could be acknowledged after the switch,
 * missing from the disk the device then serves.  In DBT and snapshot mode
 * guest I/O is paused already (the final pass): the hold adds nothing.
 */
UBM_EXPORT int ubm_mig_cutover_hold(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	int ret;

	ret = mig_check(m, true);
	if (ret)
		return ret;
	if (A_LOAD(&m->mode) != UBM_MIG_MIRROR && !A_LOAD(&m->paused))
		return ubm_fail(EAGAIN, "not in sync: dirty tracking needs a pause to cut over");
	ret = not_in_sync(m);
	if (ret < 0)
		return ret;
	/* before the hold, to keep it short */
	ret = mig_flush_dest(m);
	if (ret < 0)
		return ubm_fail(-ret, "flushing the destination failed: %s", strerror(-ret));
	m->hold_start_ns = ubm_now_ns();
	if (!A_LOAD(&m->paused)) {
		/* a pause of its own (ubm_mig_pause's flag; its length is the
		 * cutover pause, not last_pause_ns) */
		A_STORE(&m->held, 1);
		__atomic_store_n(&m->paused, 1, __ATOMIC_SEQ_CST);
		mig_wait_inflight(m);
	}
	/* nothing in flight now: what failed on the destination is recorded */
	ret = not_in_sync(m);
	if (ret < 0)
		ubm_mig_cutover_switch(t, 0);
	return ret;
}

UBM_EXPORT int ubm_mig_cutover_switch(struct ubm_target *t, uint32_t commit)
{
	struct ubm_migration *m = mig_of(t);
	int ret = mig_check(m, false);

	if (ret)
		return ret;
	if (!m->hold_start_ns)
		return ubm_fail(EINVAL, "the cutover is not held");
	if (commit) {
		A_STORE(&m->cutover_ns, ubm_now_ns());
		__atomic_store_n(&m->cut_over, 1, __ATOMIC_SEQ_CST);
		__atomic_store_n(&t->primary, SLOT_DEST, __ATOMIC_SEQ_CST);
	}
	A_STORE(&m->cutover_pause_ns, ubm_now_ns() - m->hold_start_ns);
	m->hold_start_ns = 0;
	if (A_LOAD(&m->held)) {
		A_STORE(&m->held, 0);
		__atomic_store_n(&m->paused, 0, __ATOMIC_SEQ_CST);
		/* parked requests are routed again: to the destination after a commit */
		ubm_target_ring_bells(t, ACT_RETRY_PARKED);
	}
	return 0;
}

UBM_EXPORT int ubm_mig_cutover(struct ubm_target *t)
{
	int ret = ubm_mig_cutover_hold(t);

	return ret < 0 ? ret : ubm_mig_cutover_switch(t, 1);
}

UBM_EXPORT int ubm_mig_verify(struct ubm_target *t, uint64_t *mismatched)
{
	struct ubm_migration *m = mig_of(t);
	void *a = NULL, *b = NULL;
	int ret = 0;

	*mismatched = 0;
	ret = mig_check(m, false);
	if (ret)
		return ret;
	if (!A_LOAD(&m->paused) && !A_LOAD(&m->cut_over))
		return ubm_fail(EAGAIN, "verifying needs guest I/O paused");
	if (posix_memalign(&a, 4096, m->chunk_size) || posix_memalign(&b, 4096, m->chunk_size)) {
		free(a);
		return ubm_fail(ENOMEM, "out of memory");
	}
	for (uint64_t c = 0; c < m->nr_chunks && ret == 0; c++) {
		uint64_t off = c << m->chunk_shift;
		uint32_t len = chunk_len(m, c);
		struct ubm_backend *from = m->t->be[m->gen ? layer_slot(m, c) : SLOT_SOURCE];
		int r;

		if ((r = from->ops->sync_io(from, UBLK_IO_OP_READ, a, len, off)) < 0)
			ret = ubm_fail(-r, "reading chunk %llu failed: %s", (unsigned long long)c,
				       strerror(-r));
		else if ((r = t->dest.ops->sync_io(&t->dest, UBLK_IO_OP_READ, b, len, off)) < 0)
			ret = ubm_fail(-r, "reading chunk %llu of the destination failed: %s",
				       (unsigned long long)c, strerror(-r));
		else if (memcmp(a, b, len))
			(*mismatched)++;
	}
	free(a);
	free(b);
	return ret;
}
