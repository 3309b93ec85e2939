/* SPDX-License-Identifier: MIT */
/*
 * Chunk state: the errors a migration records, the dirty map and the other chunk
 * bitmaps, and the chunk references guest writes take.
 */
#include <fcntl.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "migrate/migrate.h"

void mig_atomic_max(uint64_t *p, uint64_t v)
{
	uint64_t cur = A_LOAD(p);

	while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_RELAXED,
						       __ATOMIC_RELAXED))
		;
}

void mig_set_error(struct ubm_migration *m, int err)
{
	int32_t zero = 0;

	A_ADD(&m->dest_errors, 1);
	__atomic_compare_exchange_n(&m->error, &zero, err, false, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST);
}

/* A guest request failed on the destination with err.  One routed before
 * the last ubm_mig_reconnect() failed on a connection since replaced:
 * counted, but not the migration's error any more (its chunks went dirty all
 * the same). */
void mig_dest_failed(struct ubm_migration *m, uint32_t epoch, int err)
{
	if (epoch == A_LOAD(&m->epoch))
		mig_set_error(m, err);
	else
		A_ADD(&m->dest_errors, 1);
}

void mig_fail_deltas(struct ubm_migration *m, int err)
{
	int32_t zero = 0;
	uint32_t ok = 0;

	__atomic_compare_exchange_n(&m->error, &zero, err, false, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST);
	__atomic_compare_exchange_n(&m->delta_failed, &ok, DELTA_FAILED, false, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST);
}

void mig_mark_dirty(struct ubm_migration *m, uint64_t c)
{
	uint64_t bit = 1ull << (c % 64);

	if (!(__atomic_fetch_or(&m->dirty[c / 64], bit, __ATOMIC_SEQ_CST) & bit))
		A_ADD(&m->dirty_count, 1);
}

bool mig_clear_dirty(struct ubm_migration *m, uint64_t c)
{
	uint64_t bit = 1ull << (c % 64);

	if (__atomic_fetch_and(&m->dirty[c / 64], ~bit, __ATOMIC_SEQ_CST) & bit) {
		A_SUB(&m->dirty_count, 1);
		return true;
	}
	return false;
}

/* ---- guest request routing (queue threads) ------------------------------------ */

/* Take a reference on chunks c0..c1, or none if one is locked. */
bool mig_chunks_get(struct ubm_migration *m, uint64_t c0, uint64_t c1)
{
	for (uint64_t c = c0; c <= c1; c++) {
		uint32_t s = A_LOAD(&m->chunk[c]);

		for (;;) {
			if (s & CH_LOCKED) {
				if (!(s & CH_WAITERS) &&
				    !__atomic_compare_exchange_n(&m->chunk[c], &s, s | CH_WAITERS, false,
								 __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
					continue;
				if (c > c0)
					mig_chunks_put(m, c0, c - 1);
				return false;
			}
			if (__atomic_compare_exchange_n(&m->chunk[c], &s, s + 1, false,
							__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
				break;
		}
	}
	return true;
}

/* Let go of chunks c0..c1.  The last write to end on a chunk the copier has
 * locked wakes the copier, which waits for just that (copier.c: copier_wait). */
void mig_chunks_put(struct ubm_migration *m, uint64_t c0, uint64_t c1)
{
	for (uint64_t c = c0; c <= c1; c++) {
		uint32_t s = A_SUB(&m->chunk[c], 1);

		if ((s & CH_LOCKED) && !(s & CH_COUNT)) {
			A_ADD(&m->drained, 1);
			syscall(SYS_futex, &m->drained, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
		}
	}
}

