/* SPDX-License-Identifier: MIT */
/*
 * Chunk state: the errors a migration records, the dirty map and the other chunk
 * bitmaps, and the chunk references guest writes take.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

/* Blocks b0..b1 go dirty in the fine map (a word at a time). */
static void mark_blocks(struct ubm_migration *m, uint64_t b0, uint64_t b1)
{
	unsigned n = 0;

	while (b0 <= b1) {
		uint64_t w = b0 / 64, last = b1 / 64 == w ? b1 % 64 : 63;
		uint64_t mask = (last == 63 ? ~0ull : (1ull << (last + 1)) - 1) & (~0ull << (b0 % 64));
		uint64_t old = __atomic_fetch_or(&m->dirty_blocks[w], mask, __ATOMIC_SEQ_CST);

		n += (unsigned)__builtin_popcountll(mask & ~old);
		b0 = (w + 1) * 64;
	}
	if (n)
		A_ADD(&m->dirty_block_count, n);
}

/* The chunk's own bit, after its blocks': whoever sees it set finds them. */
static void mark_chunk(struct ubm_migration *m, uint64_t c)
{
	uint64_t bit = 1ull << (c % 64);

	if (!(__atomic_fetch_or(&m->dirty[c / 64], bit, __ATOMIC_SEQ_CST) & bit))
		A_ADD(&m->dirty_count, 1);
}

void mig_mark_dirty(struct ubm_migration *m, uint64_t c)
{
	uint64_t b0 = c << m->blocks_shift;

	mark_blocks(m, b0, b0 + ((chunk_len(m, c) - 1) >> DIRTY_BLOCK_SHIFT));
	mark_chunk(m, c);
}

void mig_mark_dirty_range(struct ubm_migration *m, uint64_t offset, uint64_t len)
{
	uint64_t c0 = offset >> m->chunk_shift, c1 = (offset + len - 1) >> m->chunk_shift;

	mark_blocks(m, offset >> DIRTY_BLOCK_SHIFT, (offset + len - 1) >> DIRTY_BLOCK_SHIFT);
	for (uint64_t c = c0; c <= c1; c++)
		mark_chunk(m, c);
}

uint64_t mig_dirty_blocks_of(struct ubm_migration *m, uint64_t c)
{
	uint64_t first = (c << m->blocks_shift) / 64, n = 0, mask = ~0ull;

	if (m->blocks_per_chunk < 64)
		mask = ((1ull << m->blocks_per_chunk) - 1) << ((c << m->blocks_shift) % 64);
	for (uint64_t w = 0; w < BLOCK_WORDS(m); w++)
		n += (uint64_t)__builtin_popcountll(A_LOAD(&m->dirty_blocks[first + w]) & mask);
	return n;
}

bool mig_clear_dirty(struct ubm_migration *m, uint64_t c, uint64_t *blocks)
{
	uint64_t bit = 1ull << (c % 64), words = BLOCK_WORDS(m);
	uint64_t first = (c << m->blocks_shift) / 64, mask = ~0ull;
	unsigned shift = 0, n = 0;
	bool was;

	was = __atomic_fetch_and(&m->dirty[c / 64], ~bit, __ATOMIC_SEQ_CST) & bit;
	if (was)
		A_SUB(&m->dirty_count, 1);
	if (m->blocks_per_chunk < 64) {  /* the chunk's blocks share a word with others */
		mask = ((1ull << m->blocks_per_chunk) - 1) << ((c << m->blocks_shift) % 64);
		shift = (unsigned)((c << m->blocks_shift) % 64);
	}
	for (uint64_t w = 0; w < words; w++) {
		uint64_t got = __atomic_fetch_and(&m->dirty_blocks[first + w], ~mask, __ATOMIC_SEQ_CST) &
			       mask;

		blocks[w] = got >> shift;
		n += (unsigned)__builtin_popcountll(got);
	}
	if (n)
		A_SUB(&m->dirty_block_count, n);
	return was;
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
				while (c-- > c0)
					A_SUB(&m->chunk[c], 1);
				return false;
			}
			if (__atomic_compare_exchange_n(&m->chunk[c], &s, s + 1, false,
							__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
				break;
		}
	}
	return true;
}

void mig_chunks_put(struct ubm_migration *m, uint64_t c0, uint64_t c1)
{
	for (uint64_t c = c0; c <= c1; c++)
		A_SUB(&m->chunk[c], 1);
}
