/* SPDX-License-Identifier: MIT */
/*
 * The cutover, and what it relies on: the destination flushed, the check that it
 * holds every byte, the window in which the record is made; verify.
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
 *   prepare  check that the destination holds every byte, flush it (what the
 *            copier wrote must be durable there: the guest flushed it on the
 *            source), open the cutover's window (m->switching), check again;
 *   (the control plane makes durable the record saying the destination is
 *   the disk, while guest I/O goes on)
 *   switch   commit: from here on every request goes to the destination; or
 *            cancel: the window closes and the source stays the disk.
 *
 * Mirror mode holds no guest request for this, nor DBT and snapshot modes,
 * which mirror the guest's writes for their last pass and the cutover
 * (ubm_mig_set_mode(MIRROR); snapshot's go to the active delta and the
 * destination).  What makes that safe is the window: while it is open,
 * both images hold every write the guest was told
 * is done, so a daemon that dies with the record half made leaves its
 * successor a right image whichever one the record names:
 * - every write is mirrored: every chunk is copied and clean, and the mode
 *   cannot change (ubm_mig_set_mode refuses) nor the connections be replaced
 *   (ubm_mig_reconnect refuses);
 * - a mirrored write whose destination part fails is not answered (io_done()
 *   parks it) until the window closes, then routed again: to the destination
 *   alone after a commit (it is the disk), to both after a cancel, which the
 *   caller makes only once its record names the source again.
 * The ordering: the window opens (seq_cst, and a fence) before the second
 * check; a destination part that fails dirties its chunks (seq_cst) before
 * its io_done() loads the flag (seq_cst).  Either the check sees the dirt
 * (prepare refuses: the write is answered from the source, which stays the
 * disk), or the write sees the window and waits.
 *
 * A mirrored write still in flight at the switch ends on both sides; if its
 * destination part fails, it too is parked and tried again there.  A record
 * made while guest I/O is held costs the guest its length (38-62 ms of
 * Python writing three files in the kernel VM under load); this costs it
 * nothing.
 */
UBM_EXPORT int ubm_mig_cutover_prepare(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	int ret;

	ret = mig_check(m, true);
	if (ret)
		return ret;
	if (A_LOAD(&m->mode) != UBM_MIG_MIRROR && !A_LOAD(&m->snap_mirror) &&
	    !A_LOAD(&m->paused))
		return ubm_fail(EAGAIN, "not in sync: unmirrored writes need a pause to cut over");
	if (A_LOAD(&m->switching))
		return ubm_fail(EBUSY, "a cutover is under way already");
	ret = not_in_sync(m);
	if (ret < 0)
		return ret;
	ret = mig_flush_dest(m);
	if (ret < 0)
		return ubm_fail(-ret, "flushing the destination failed: %s", strerror(-ret));
	m->window_start_ns = ubm_now_ns();
	__atomic_store_n(&m->switching, 1, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	ret = not_in_sync(m);
	if (ret < 0)
		ubm_mig_cutover_switch(t, UBM_CUTOVER_CANCEL);
	return ret;
}

UBM_EXPORT int ubm_mig_cutover_switch(struct ubm_target *t, uint32_t how)
{
	struct ubm_migration *m = mig_of(t);
	int ret = mig_check(m, false);
	uint64_t now;

	if (ret)
		return ret;
	if (how > UBM_CUTOVER_FORCE)
		return ubm_fail(EINVAL, "no such cutover step: %u", how);
	if (!A_LOAD(&m->switching))
		return ubm_fail(EINVAL, "no cutover is under way");
	/* a destination failure in the window: the window stays open (the writes
	 * it failed wait) until the caller's record names the source again */
	if (how == UBM_CUTOVER_COMMIT && (ret = not_in_sync(m)) < 0)
		return ret;
	now = ubm_now_ns();
	if (how != UBM_CUTOVER_CANCEL) {
		A_STORE(&m->cutover_ns, now);
		__atomic_store_n(&m->cut_over, 1, __ATOMIC_SEQ_CST);
		__atomic_store_n(&t->primary, SLOT_DEST, __ATOMIC_SEQ_CST);
	}
	/* guest I/O paused around the switch (a cutover made paused, as a
	 * --verify one) */
	A_STORE(&m->cutover_pause_ns, A_LOAD(&m->paused) ? now - m->window_start_ns : 0);
	/* (after cut_over: a write that failed on the destination before the
	 * switch keeps waiting, io_done() looks at both) */
	__atomic_store_n(&m->switching, 0, __ATOMIC_SEQ_CST);
	/* the writes the window parked are routed again: to the destination after a commit */
	ubm_target_ring_bells(t, ACT_RETRY_PARKED);
	return 0;
}

UBM_EXPORT int ubm_mig_cutover(struct ubm_target *t)
{
	int ret = ubm_mig_cutover_prepare(t);

	if (ret < 0)
		return ret;
	ret = ubm_mig_cutover_switch(t, UBM_CUTOVER_COMMIT);
	if (ret < 0)
		ubm_mig_cutover_switch(t, UBM_CUTOVER_CANCEL);
	return ret;
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
