/* SPDX-License-Identifier: MIT */
/*
 * Live migration: the routing of guest requests while a target's data moves
 * to a destination, and the copier.
 *
 * The disk is cut into chunks.  Each chunk has one atomic state word:
 *
 *   COPIED   the destination holds the chunk (unless it is also dirty)
 *   LOCKED   the copier is copying it: guest writes to it wait (park)
 *   WAITERS  a parked request waits for the lock (or COW) to go
 *   COW      snapshot: a queue is copying the chunk into the active delta
 *   count    guest writes in flight on the chunk
 *
 * A guest write takes a reference on every chunk it touches, unless one is
 * locked (then it parks until the copier unlocks).  The copier locks a chunk
 * and waits until its count drops to zero before it reads the source: a
 * write that arrived before the lock is on the source by then.  Writes to
 * chunks that are not dirty are mirrored in mirror mode (to both sides); any
 * other write goes to the source only, and if it touched a copied chunk,
 * marks it dirty when it completes (and the copier clears the bit before it
 * reads), so the next pass copies it again.  Discards and write-zeroes follow
 * the same rules.
 *
 * Snapshot mode keeps the source frozen: guest writes go to the active
 * delta (a sparse file, DELTA_PATH.g), after the chunk is copied into it from its
 * newest layer (copy on write, at chunk granularity, on the queue thread);
 * reads go to each chunk's newest layer (newest[c]: 0 the source, g the
 * delta of generation g).  ubm_mig_new_delta() freezes the active delta and
 * opens the next; the copier copies each chunk from its newest layer, except
 * the active one until the final (paused) pass.  Deltas live until the end:
 * a cancel folds them back into the source.  Each copy on write is recorded
 * in the layer map (layermap.c), which a FLUSH or FUA write makes durable
 * before it is acknowledged: a daemon that dies leaves the deltas and the map,
 * and `serve` (a takeover or not) folds them back (ublkmig.snapshot).
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CH_COUNT 0x07ffffffu
#define CH_COW (1u << 27)
#define CH_COPIED (1u << 28)
#define CH_WAITERS (1u << 29)
#define CH_LOCKED (1u << 30)

#define MIG_IO_MIRRORED 1  /* sent to both sides */
#define MIG_IO_TRACKED 2   /* source only, touching copied chunks: dirty them when done */
#define MIG_IO_REFS 4      /* holds chunk references */
#define MIG_IO_DEST_FAILED 8  /* its destination part failed, and that is recorded */
#define MIG_IO_DEST_DONE 16   /* mirrored: its destination part ended */
#define MIG_IO_WAITING 32     /* mirrored: source done, waiting for the destination (counted) */

#define FOLD_BATCH 64      /* snapshot fold-back: chunks copied per fdatasync of the source */
#define HOT_PASSES 2       /* dirtied again in this many dirty passes: defer to the final one */
#define MAX_COPY_DEPTH 16
/* a destination that can lose its connections (NBD) is flushed this often
 * while the copier runs: what a lost connection may have lost since is what
 * is copied again (ubm_mig_reconnect) */
#define FLUSH_INTERVAL_NS 1000000000ull

enum { CS_FREE = 0, CS_LOCKING, CS_READING, CS_CHECKING, CS_WRITING };

struct copy_slot {
	int state;
	unsigned from;     /* backend slot the chunk is read from */
	uint64_t chunk;
	bool first_copy;   /* the copier has not copied the chunk before */
	bool fresh;        /* ... and nothing wrote it on the destination: on a zeroed
			    * destination it reads as zeroes */
	bool check;        /* resuming: compare with the destination's before writing */
	bool zero;         /* the source chunk reads as zeroes */
	uint64_t t_start;  /* when the copy began (ns) */
	void *buf;
	void *check_buf;   /* the destination's chunk, when checking */
};

struct ubm_migration {
	struct ubm_target *t;
	uint64_t size, chunk_size, nr_chunks;
	unsigned chunk_shift;
	uint32_t *chunk;           /* state words */
	uint64_t *dirty;           /* bitmap */
	uint64_t *dest_written;    /* bitmap: chunks a guest write was sent to on the destination
				    * (a zero chunk there is not known to read as zeroes) */
	uint64_t *unflushed;       /* bitmap: chunks written on the destination since its last
				    * successful flush (a lost connection may have lost them) */
	uint8_t *hot;              /* dirty passes a chunk was copied in, in a row */
	uint8_t *newest;           /* snapshot: generation holding each chunk's newest data */
	struct ubm_backend delta[UBM_MAX_DELTAS];
	uint32_t gen;              /* snapshot: the active delta's generation (1..) */
	uint64_t delta_chunks, cow_chunks;
	char *delta_path;          /* snapshot: deltas DELTA_PATH.g, map DELTA_PATH.map */
	struct ubm_layer_map map;  /* snapshot: which delta holds each chunk, on disk */
	bool map_open;
	bool delta_created[UBM_MAX_DELTAS];
	bool deltas_done;          /* folded back or cut over: the files can go */
	uint32_t mode;
	uint32_t paused;
	uint32_t abort;
	uint32_t cut_over;
	uint32_t held;             /* the cutover's hold paused guest I/O (ubm_mig_cutover_hold) */
	uint64_t hold_start_ns, cutover_pause_ns;
	uint64_t last_flush_ns;    /* the copier's last flush of the destination */
	int32_t error;
	uint32_t epoch;            /* ubm_mig_reconnect() count: failures routed before are old */
	uint32_t delta_failed;     /* snapshot: DELTA_FAILED or DELTA_UNFOLDABLE, else 0 */
	bool dest_zeroed;
	uint64_t check_below;      /* resuming: first chunks maybe on the destination already */
	uint64_t speed;
	uint64_t inflight;         /* guest requests routed by the migration */
	uint64_t unmirrored;       /* ... of which writes to copied chunks on the source only */
	uint64_t dirty_count, hot_count, chunks_copied, cursor;
	uint64_t bytes_copied, bytes_skipped, bytes_read, bytes_matched, passes;
	uint64_t mirrored_writes, tracked_writes, parked, dest_errors;
	uint64_t max_latency_ns, cutover_latency_ns, cutover_ns;
	uint64_t mirror_waits, mirror_wait_ns;
	uint64_t dest_waiting;     /* mirrored writes done on the source, not yet on the dest */
	uint64_t dest_waiting_since; /* ... the sum of the times their source parts ended */
	uint64_t yield_ns;         /* the copier held back reads for guest I/O (busy_depth) */
	uint64_t pause_start_ns, last_pause_ns;
	/* the copier */
	struct ubm_queue cq;
	struct copy_slot slots[MAX_COPY_DEPTH];
	unsigned copy_depth;
	unsigned busy_depth;       /* source reads while the guest has requests in flight */
	uint64_t busy_resume_ns;   /* ... and none starts before this (the copier thread's) */
};

#define A_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define A_ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define A_SUB(p, v) __atomic_sub_fetch((p), (v), __ATOMIC_SEQ_CST)

static void atomic_max(uint64_t *p, uint64_t v)
{
	uint64_t cur = A_LOAD(p);

	while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_RELAXED,
						       __ATOMIC_RELAXED))
		;
}

static void set_error(struct ubm_migration *m, int err)
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
static void dest_failed(struct ubm_migration *m, const struct ubm_io *io, int err)
{
	if (io->mig_epoch == A_LOAD(&m->epoch))
		set_error(m, err);
	else
		A_ADD(&m->dest_errors, 1);
}

/*
 * Snapshot: a delta (beside the source) failed, e.g. its filesystem is full.
 * The guest must not see that: the migration fails, and guest writes wait
 * (parked) until ubm_mig_finish() has folded the deltas back into the
 * source, then go there.
 */
enum {
	DELTA_FAILED = 1,      /* guest writes wait for the fold-back */
	DELTA_UNFOLDABLE = 2,  /* the fold-back failed too: they go on (and fail as they would) */
};

static void fail_deltas(struct ubm_migration *m, int err)
{
	int32_t zero = 0;
	uint32_t ok = 0;

	__atomic_compare_exchange_n(&m->error, &zero, err, false, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST);
	__atomic_compare_exchange_n(&m->delta_failed, &ok, DELTA_FAILED, false, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST);
}

/* ---- chunk bitmaps: the dirty map, what the destination was written ------------ */

static bool bit_test(uint64_t *map, uint64_t c)
{
	return A_LOAD(&map[c / 64]) & (1ull << (c % 64));
}

static void bit_set(uint64_t *map, uint64_t c)
{
	uint64_t bit = 1ull << (c % 64);

	if (!(A_LOAD(&map[c / 64]) & bit))
		__atomic_fetch_or(&map[c / 64], bit, __ATOMIC_SEQ_CST);
}

static bool is_dirty(struct ubm_migration *m, uint64_t c)
{
	return bit_test(m->dirty, c);
}

static void mark_dirty(struct ubm_migration *m, uint64_t c)
{
	uint64_t bit = 1ull << (c % 64);

	if (!(__atomic_fetch_or(&m->dirty[c / 64], bit, __ATOMIC_SEQ_CST) & bit))
		A_ADD(&m->dirty_count, 1);
}

static bool clear_dirty(struct ubm_migration *m, uint64_t c)
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
static bool chunks_get(struct ubm_migration *m, uint64_t c0, uint64_t c1)
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

static void chunks_put(struct ubm_migration *m, uint64_t c0, uint64_t c1)
{
	for (uint64_t c = c0; c <= c1; c++)
		A_SUB(&m->chunk[c], 1);
}

static bool is_write(uint8_t op)
{
	return op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_DISCARD || op == UBLK_IO_OP_WRITE_ZEROES;
}

/* Send the request (or a part of it) to backend `slot`. */
static void to_slot(struct ubm_io *io, unsigned slot, uint64_t offset, uint32_t len)
{
	struct ubm_req *r = &io->sreq[slot];
	uint32_t skip = (uint32_t)(offset - io->req.offset);

	*r = io->req;
	r->offset = offset;
	r->len = len;
	if (r->buf)
		r->buf = (char *)r->buf + skip;
	r->buf_off += skip;
	io->slots |= (uint16_t)(1u << slot);
}

/* Snapshot: the backend slot holding the newest data of chunk c. */
static unsigned layer_slot(struct ubm_migration *m, uint64_t c)
{
	unsigned gen = A_LOAD(&m->newest[c]);

	return gen ? SLOT_DELTA0 + gen - 1 : SLOT_SOURCE;
}

static int snapshot_cow(struct ubm_migration *m, uint64_t c);

/* Snapshot routing: reads from the newest layer of each chunk, writes to
 * the active delta (after copying the chunk into it if it is not there). */
static int snapshot_route(struct ubm_migration *m, struct ubm_io *io, uint64_t c0, uint64_t c1)
{
	const struct ubm_req *req = &io->req;
	unsigned active = A_LOAD(&m->gen), s0, s1;
	int ret;

	if (req->op == UBLK_IO_OP_FLUSH) {
		/* every delta holds data the guest wrote, and the layer map
		 * where: the records so far are durable before it is done */
		io->map_mark = ubm_layer_map_mark(&m->map);
		for (unsigned g = 1; g <= active; g++)
			to_slot(io, SLOT_DELTA0 + g - 1, 0, 0);
		return 0;
	}
	if (!is_write(req->op)) {
		s0 = layer_slot(m, c0);
		s1 = layer_slot(m, c1);
		if (s0 == s1) {
			to_slot(io, s0, req->offset, req->len);
		} else {
			uint64_t split = c1 << m->chunk_shift;

			to_slot(io, s0, req->offset, (uint32_t)(split - req->offset));
			to_slot(io, s1, split, (uint32_t)(req->offset + req->len - split));
		}
		return 0;
	}
	for (uint64_t c = c0; c <= c1; c++) {
		if (A_LOAD(&m->newest[c]) == active)
			continue;
		ret = snapshot_cow(m, c);
		if (ret < 0) {
			fail_deltas(m, ret);
			ret = 1;
		}
		if (ret)
			return ret;  /* another queue is copying it, or the deltas failed: park */
	}
	io->mflags |= MIG_IO_TRACKED;
	A_ADD(&m->unmirrored, 1);
	/* FUA: its chunks' records (added above, if copied now) durable too */
	io->map_mark = ubm_layer_map_mark(&m->map);
	to_slot(io, SLOT_DELTA0 + active - 1, req->offset, req->len);
	return 0;
}

/* Decide where a request goes: fills io->slots and io->sreq[].  Returns 0,
 * 1 when it must wait (park), or -errno to fail it. */
int ubm_mig_route(struct ubm_migration *m, struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	const struct ubm_req *req = &io->req;
	uint32_t mode = A_LOAD(&m->mode);
	uint64_t c0 = 0, c1 = 0;
	bool mirror;
	int ret;

	if (!io->t_start)
		io->t_start = ubm_now_ns();
	io->mig_epoch = A_LOAD(&m->epoch);
	io->mflags = 0;
	io->slots = 0;
	/* announce first, then look at the pause flag: ubm_mig_pause() sets
	 * the flag first, then waits for the count to drain */
	A_ADD(&m->inflight, 1);
	if (ubm_unlikely(A_LOAD(&m->paused)))
		goto park;
	if (A_LOAD(&m->cut_over)) {
		to_slot(io, SLOT_DEST, req->offset, req->len);
		return 0;
	}
	if (req->len) {
		c0 = req->offset >> m->chunk_shift;
		c1 = (req->offset + req->len - 1) >> m->chunk_shift;
	}
	if (mode == UBM_MIG_SNAPSHOT) {
		if ((is_write(req->op) || req->op == UBLK_IO_OP_FLUSH) &&
		    ubm_unlikely(A_LOAD(&m->delta_failed) == DELTA_FAILED))
			goto park;  /* until the deltas are folded back into the source */
		if (is_write(req->op) && req->len) {
			if (!chunks_get(m, c0, c1))
				goto park;
			io->mflags = MIG_IO_REFS;
		}
		ret = snapshot_route(m, io, c0, c1);
		if (ret == 1) {
			chunks_put(m, c0, c1);
			io->mflags = 0;
			goto park;
		}
		return ret;
	}
	if (req->op == UBLK_IO_OP_FLUSH) {
		/* durable on both: mirrored writes and copied chunks sit on the destination */
		to_slot(io, SLOT_SOURCE, 0, 0);
		to_slot(io, SLOT_DEST, 0, 0);
		return 0;
	}
	if (!is_write(req->op) || req->len == 0) {
		to_slot(io, SLOT_SOURCE, req->offset, req->len);
		return 0;
	}
	if (!chunks_get(m, c0, c1))
		goto park;
	io->mflags = MIG_IO_REFS;
	mirror = mode == UBM_MIG_MIRROR;
	/* Mirror mode mirrors every write, also where a chunk is not copied
	 * yet or is dirty (a destination error, or a connection lost, left it
	 * behind): the copier copies such a chunk after this write is done (it
	 * holds a reference), so the destination ends with the source's data.
	 * Sending a write that touches a dirty chunk to the source only would
	 * dirty its clean chunks too: under a busy guest, dirt would spread
	 * from chunk to chunk faster than the copier cleans it. */
	to_slot(io, SLOT_SOURCE, req->offset, req->len);
	if (mirror) {
		io->mflags |= MIG_IO_MIRRORED;
		/* before it is sent: the copier (waiting for this write's
		 * reference) must not take the destination's chunk for zeroes */
		for (uint64_t c = c0; c <= c1; c++)
			bit_set(m->dest_written, c);
		to_slot(io, SLOT_DEST, req->offset, req->len);
		return 0;
	}
	for (uint64_t c = c0; c <= c1; c++) {
		if (A_LOAD(&m->chunk[c]) & CH_COPIED) {  /* dbt: a copied chunk goes dirty */
			io->mflags |= MIG_IO_TRACKED;
			A_ADD(&m->unmirrored, 1);
			break;
		}
	}
	return 0;
park:
	A_SUB(&m->inflight, 1);
	A_ADD(&m->parked, 1);
	return 1;
}

/*
 * A backend's part of a request routed by the migration ended with res
 * (bytes, or -errno).  A destination failure is recorded here, the moment it
 * happens, not when the whole request ends: a mirrored write whose source
 * part is still in flight must not look clean to a cutover meanwhile.  The
 * chunks go dirty while the write still holds their references, so a copier
 * waiting for those sees the bit.
 */
void ubm_mig_part_done(struct ubm_migration *m, struct ubm_io *io, unsigned slot, int res)
{
	const struct ubm_req *req = &io->req;
	bool data = is_write(req->op) && req->len;
	uint64_t c0 = 0, c1 = 0;

	if (slot == SLOT_SOURCE) {
		if (io->mflags & MIG_IO_MIRRORED) {
			io->t_source_done = ubm_now_ns();
			/* the guest now waits for the destination alone: counted
			 * while it does, so a destination that stops answering
			 * shows before any write completes (auto mode's fallback) */
			if (!(io->mflags & MIG_IO_DEST_DONE)) {
				io->mflags |= MIG_IO_WAITING;
				A_ADD(&m->dest_waiting_since, io->t_source_done);
				A_ADD(&m->dest_waiting, 1);
			}
		}
		return;
	}
	if (slot == SLOT_DEST) {
		io->mflags |= MIG_IO_DEST_DONE;
		if (io->mflags & MIG_IO_WAITING) {
			io->mflags &= ~MIG_IO_WAITING;
			A_SUB(&m->dest_waiting, 1);
			A_SUB(&m->dest_waiting_since, io->t_source_done);
		}
	}
	/* after the cutover the destination is the disk: its errors are the guest's */
	if (slot != SLOT_DEST || A_LOAD(&m->cut_over))
		return;
	if (data) {
		c0 = req->offset >> m->chunk_shift;
		c1 = (req->offset + req->len - 1) >> m->chunk_shift;
	}
	if (res >= 0) {
		/* acknowledged, not yet durable: a lost connection may lose it */
		for (uint64_t c = c0; data && c <= c1; c++)
			bit_set(m->unflushed, c);
		return;
	}
	if (io->mflags & MIG_IO_DEST_FAILED)
		return;
	io->mflags |= MIG_IO_DEST_FAILED;
	/* the source has it (or will), the destination may not */
	for (uint64_t c = c0; data && c <= c1; c++)
		mark_dirty(m, c);
	dest_failed(m, io, res);
}

int ubm_mig_io_done(struct ubm_migration *m, struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	const struct ubm_req *req = &io->req;
	uint64_t now = ubm_now_ns(), lat = now - io->t_start, cut;
	bool cut_over = A_LOAD(&m->cut_over);
	bool durable = req->op == UBLK_IO_OP_FLUSH ||
		       (is_write(req->op) && (req->flags & UBLK_IO_F_FUA));

	/* snapshot: a FLUSH or FUA write is acknowledged only once the layer
	 * map says, durably, where the data it covers lives (layermap.c) */
	if (durable && io->result >= 0 && !cut_over && m->map_open) {
		int fds[UBM_MAX_DELTAS];
		unsigned n = A_LOAD(&m->gen);
		int ret;

		for (unsigned g = 0; g < n; g++)
			fds[g] = m->delta[g].fd;
		ret = ubm_layer_map_commit(&m->map, io->map_mark, fds, n);
		if (ret < 0)
			io->result = ret;
	}
	/* a snapshot write or flush that failed on a delta is tried again
	 * once the deltas are folded back into the source (fail_deltas) */
	bool retry = io->result < 0 && !cut_over && A_LOAD(&m->mode) == UBM_MIG_SNAPSHOT &&
		     (is_write(req->op) || req->op == UBLK_IO_OP_FLUSH) &&
		     A_LOAD(&m->delta_failed) != DELTA_UNFOLDABLE;

	if (retry)
		fail_deltas(m, io->result);

	if (io->mflags & MIG_IO_REFS) {
		uint64_t c0 = req->offset >> m->chunk_shift;
		uint64_t c1 = (req->offset + req->len - 1) >> m->chunk_shift;

		if (io->mflags & MIG_IO_MIRRORED) {
			A_ADD(&m->mirrored_writes, 1);
			/* the source was done first: the guest waited for the destination */
			if (io->t_source_done && now > io->t_source_done) {
				A_ADD(&m->mirror_waits, 1);
				A_ADD(&m->mirror_wait_ns, now - io->t_source_done);
			}
			io->t_source_done = 0;
			/* (a destination failure is recorded already: ubm_mig_part_done) */
		} else if (io->mflags & MIG_IO_TRACKED) {
			A_ADD(&m->tracked_writes, 1);
			if (io->result >= 0) {
				for (uint64_t c = c0; c <= c1; c++)
					mark_dirty(m, c);
			}
			A_SUB(&m->unmirrored, 1);
		}
		/* dirty before unreferenced: a copier waiting for the count sees the bit */
		chunks_put(m, c0, c1);
	}
	if (retry) {
		A_SUB(&m->inflight, 1);
		A_ADD(&m->parked, 1);
		return 1;  /* t_start stays: the latency counts from the first try */
	}
	atomic_max(&m->max_latency_ns, lat);
	cut = A_LOAD(&m->cutover_ns);
	if (cut && now + 1000000000ull > cut && now < cut + 1000000000ull)
		atomic_max(&m->cutover_latency_ns, lat);
	io->t_start = 0;
	A_SUB(&m->inflight, 1);
	return 0;
}

/* ---- control ----------------------------------------------------------------- */

/*
 * Wait for the migration's guest requests to drain.  A simulator has no
 * thread of its own: its caller (who must be the one calling) drives it.
 */
static void wait_inflight(struct ubm_migration *m)
{
	while (__atomic_load_n(&m->inflight, __ATOMIC_SEQ_CST)) {
		for (unsigned i = 0; i < m->t->nr_queues; i++) {
			struct ubm_queue *q = &m->t->queues[i];

			if (!q->dev) {
				io_uring_submit(&q->ring);
				ubm_queue_reap(q);
			}
		}
		usleep(50);
	}
}

static int same_storage(const struct ubm_backend *a, const struct ubm_backend *b)
{
	struct stat sa, sb;

	if (fstat(a->fd, &sa) < 0 || fstat(b->fd, &sb) < 0)
		return 0;
	if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode))
		return sa.st_rdev == sb.st_rdev;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static void copier_be_done(struct ubm_queue *q, unsigned tag, unsigned slot, int res);

static void mig_free(struct ubm_migration *m)
{
	if (!m)
		return;
	if (m->t->dest.ops && m->t->dest.ops->detach)
		m->t->dest.ops->detach(&m->t->dest, &m->cq);
	ubm_queue_ring_exit(&m->cq);
	for (unsigned i = 0; i < MAX_COPY_DEPTH; i++) {
		free(m->slots[i].buf);
		free(m->slots[i].check_buf);
	}
	for (unsigned g = 0; g < UBM_MAX_DELTAS; g++) {
		if (m->delta[g].ops)
			m->delta[g].ops->close(&m->delta[g]);
	}
	if (m->map_open) {
		/* the map first: without it the deltas mean nothing, while a
		 * map naming a missing delta fails a recovery (closed) */
		if (m->deltas_done) {
			char path[PATH_MAX];

			if (m->map.created) {
				snprintf(path, sizeof(path), "%s.map", m->delta_path);
				unlink(path);
			}
			for (unsigned g = 1; g <= UBM_MAX_DELTAS; g++) {
				snprintf(path, sizeof(path), "%s.%u", m->delta_path, g);
				if (m->delta_created[g - 1])
					unlink(path);
			}
		}
		ubm_layer_map_close(&m->map);
	}
	free(m->cq.ios);
	free(m->chunk);
	free(m->dirty);
	free(m->dest_written);
	free(m->unflushed);
	free(m->hot);
	free(m->newest);
	free(m->delta_path);
	free(m);
}

int ubm_fixed_migration_files = -1;

/* The fixed-file index for a migration backend at `slot`, or -1 for a plain fd. */
static int migration_file_index(unsigned slot)
{
	static int from_kernel = -1;
	struct utsname u;
	unsigned major = 0, minor = 0;

	if (ubm_fixed_migration_files >= 0)
		return ubm_fixed_migration_files ? (int)FILE_OF_SLOT(slot) : -1;
	if (from_kernel < 0) {
		/* the io_uring resource rework of 6.13 puts files per request */
		from_kernel = uname(&u) == 0 && sscanf(u.release, "%u.%u", &major, &minor) == 2 &&
			(major > 6 || (major == 6 && minor >= 13));
	}
	return from_kernel ? (int)FILE_OF_SLOT(slot) : -1;
}

/* Install backend `be` at `slot` in every ring (queues and copier), or with
 * be NULL empty the slot; a backend named by its plain fd leaves it empty. */
static int install(struct ubm_migration *m, unsigned slot, struct ubm_backend *be)
{
	int fd = be && be->file_index >= 0 ? be->fd : -1;
	int ret = ubm_queue_set_file(&m->cq, FILE_OF_SLOT(slot), fd);

	if (ret == 0)
		ret = ubm_target_set_file(m->t, slot, fd);
	return ret;
}

/* fsync the folder holding path: a name created in it is durable */
static int sync_dir_of(const char *path)
{
	char dir[PATH_MAX];
	const char *slash = strrchr(path, '/');
	int fd, ret = 0;

	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash == path ? 1 : slash - path), path);
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0)
		ret = -errno;
	if (fd >= 0)
		close(fd);
	return ret;
}

/* Snapshot: create the delta of generation g (DELTA_PATH.g, sparse), its name
 * durable before the layer map can name it. */
static int open_delta(struct ubm_migration *m, unsigned g)
{
	struct ubm_backend *d = &m->delta[g - 1];
	char path[PATH_MAX];
	int fd, err;

	snprintf(path, sizeof(path), "%s.%u", m->delta_path, g);
	fd = open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0) {
		err = errno;
		if (err == EEXIST)
			return ubm_fail(EEXIST, "the delta file %s exists already (left by a snapshot "
					"migration that did not end?)", path);
		return ubm_fail(err, "cannot create the delta file %s: %s", path, strerror(err));
	}
	memset(d, 0, sizeof(*d));
	m->delta_created[g - 1] = true;
	d->fd = fd;
	err = ftruncate(fd, (off_t)m->size) < 0 ? errno : -sync_dir_of(path);
	if (err) {
		unlink(path);
		close(fd);
		d->fd = -1;
		m->delta_created[g - 1] = false;
		return ubm_fail(err, "cannot size the delta file %s: %s", path, strerror(err));
	}
	d->ops = &ubm_file_backend_ops;
	d->size = m->size;
	d->logical_bs = m->t->source.logical_bs;
	d->file_index = migration_file_index(SLOT_DELTA0 + g - 1);
	d->can_discard = true;
	m->t->be[SLOT_DELTA0 + g - 1] = d;
	return install(m, SLOT_DELTA0 + g - 1, d);
}

static __thread void *cow_buf;
static __thread size_t cow_len;

/* pread/pwrite a whole range, retrying short transfers. */
static int copy_range(int from, int to, uint64_t off, size_t len, void *buf)
{
	for (size_t done = 0; done < len;) {
		ssize_t n = pread(from, (char *)buf + done, len - done, (off_t)(off + done));

		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	for (size_t done = 0; done < len;) {
		ssize_t n = pwrite(to, (char *)buf + done, len - done, (off_t)(off + done));

		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	return 0;
}

static uint32_t chunk_len(struct ubm_migration *m, uint64_t c);

/*
 * Snapshot copy-on-write: bring chunk c into the active delta before a write
 * lands in it.  Runs on a queue thread holding a reference on c (so the
 * copier leaves c alone); the COW bit keeps a second queue out (it parks).
 * Returns 0, 1 (park) or -errno.
 */
static int snapshot_cow(struct ubm_migration *m, uint64_t c)
{
	unsigned active = A_LOAD(&m->gen), from;
	uint32_t s = A_LOAD(&m->chunk[c]), len = chunk_len(m, c);
	int ret;

	for (;;) {
		if (s & CH_COW) {
			if ((s & CH_WAITERS) ||
			    __atomic_compare_exchange_n(&m->chunk[c], &s, s | CH_WAITERS, false,
							__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
				return 1;
			continue;
		}
		if (__atomic_compare_exchange_n(&m->chunk[c], &s, s | CH_COW, false,
						__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
			break;
	}
	ret = 0;
	if (A_LOAD(&m->newest[c]) != active) {  /* not done by the queue we waited for */
		from = A_LOAD(&m->newest[c]);
		if (cow_len < m->chunk_size) {
			free(cow_buf);
			cow_len = 0;
			if (posix_memalign(&cow_buf, 4096, m->chunk_size))
				ret = -ENOMEM;
			else
				cow_len = m->chunk_size;
		}
		int fd = from ? m->delta[from - 1].fd : m->t->source.fd;
		off_t data = lseek(fd, (off_t)(c << m->chunk_shift), SEEK_DATA);

		/* a hole stays a hole: the delta's chunk was never written */
		if (ret == 0 && !((data < 0 && errno == ENXIO) ||
				  (data >= 0 && (uint64_t)data >= (c << m->chunk_shift) + len)))
			ret = copy_range(fd, m->delta[active - 1].fd, c << m->chunk_shift, len,
					 cow_buf);
		/* the copy is complete (in the delta's page cache): the map may
		 * name it; a FLUSH makes both durable, the data first */
		if (ret == 0)
			ret = ubm_layer_map_add(&m->map, c, active);
		if (ret == 0) {
			A_STORE(&m->newest[c], (uint8_t)active);
			A_ADD(&m->cow_chunks, 1);
			A_ADD(&m->delta_chunks, 1);
			/* the chunk changed layer: the final pass must take it even
			 * if the write that caused this parks and never lands */
			mark_dirty(m, c);
		}
	}
	s = __atomic_fetch_and(&m->chunk[c], ~(CH_COW | CH_WAITERS), __ATOMIC_SEQ_CST);
	if (s & CH_WAITERS)
		ubm_target_ring_bells(m->t, ACT_RETRY_PARKED);
	return ret;
}

UBM_EXPORT int ubm_mig_start(struct ubm_target *t, const struct ubm_mig_config *cfg)
{
	struct ubm_backend *dest = &t->dest;
	struct ubm_migration *m;
	int ret;

	if (t->mig)
		return ubm_fail(EBUSY, "a migration is already running on this device");
	if (t->primary != SLOT_SOURCE)
		return ubm_fail(EINVAL, "this device was migrated already");
	/* the copier, copy on write, verify and fold-back read the source by
	 * its fd: a file or a block device */
	if (t->source.ops != &ubm_file_backend_ops)
		return ubm_fail(EOPNOTSUPP, "%s: migrating a device that serves an NBD export is "
				"not supported", t->source_path);
	if (cfg->mode > UBM_MIG_SNAPSHOT)
		return ubm_fail(EINVAL, "unknown migration mode %u", cfg->mode);
	if (cfg->chunk_size < (64u << 10) || cfg->chunk_size > (64u << 20) ||
	    (cfg->chunk_size & (cfg->chunk_size - 1)))
		return ubm_fail(EINVAL, "chunk size must be a power of two from 64 KiB to 64 MiB");
	if (cfg->copy_depth > MAX_COPY_DEPTH)
		return ubm_fail(EINVAL, "copy depth must be at most %d", MAX_COPY_DEPTH);
	/* a request then spans at most two chunks: at most two layers to read */
	if (cfg->mode == UBM_MIG_SNAPSHOT && cfg->chunk_size < t->max_io)
		return ubm_fail(EINVAL, "snapshot mode needs chunks of at least %u KiB (the largest "
				"request)", t->max_io >> 10);

	memset(dest, 0, sizeof(*dest));
	dest->ops = ubm_is_nbd_uri(cfg->dest_path) ? &ubm_nbd_backend_ops : &ubm_file_backend_ops;
	dest->fd = -1;
	dest->file_index = migration_file_index(SLOT_DEST);
	dest->logical_bs = t->source.logical_bs;
	dest->direct = cfg->direct;
	dest->timeout_ms = cfg->dest_timeout_ms;
	dest->via_fd = cfg->dest_fd;
	ret = dest->ops->open(dest, cfg->dest_path);
	if (ret < 0)
		return ret;
	if (same_storage(&t->source, dest)) {
		dest->ops->close(dest);
		return ubm_fail(EINVAL, "%s: the destination is the source", cfg->dest_path);
	}
	if (dest->size < t->source.size) {
		dest->ops->close(dest);
		return ubm_fail(ENOSPC, "%s: the destination (%llu bytes) is smaller than the source "
				"(%llu bytes)", cfg->dest_path, (unsigned long long)dest->size,
				(unsigned long long)t->source.size);
	}
	if (dest->max_io && (cfg->chunk_size > dest->max_io || t->max_io > dest->max_io)) {
		dest->ops->close(dest);
		return ubm_fail(EINVAL, "%s: the destination takes at most %u KiB at a time; use "
				"smaller chunks", cfg->dest_path, dest->max_io >> 10);
	}

	m = calloc(1, sizeof(*m));
	if (!m) {
		dest->ops->close(dest);
		return ubm_fail(ENOMEM, "out of memory");
	}
	m->t = t;
	m->size = t->source.size;
	m->chunk_size = cfg->chunk_size;
	m->chunk_shift = (unsigned)__builtin_ctzll(cfg->chunk_size);
	m->nr_chunks = (m->size + m->chunk_size - 1) >> m->chunk_shift;
	m->mode = cfg->mode;
	m->speed = cfg->speed;
	m->dest_zeroed = cfg->dest_zeroed;
	m->check_below = cfg->dest_zeroed ? 0 : cfg->check_below;
	m->copy_depth = cfg->copy_depth ? cfg->copy_depth : 4;
	m->last_flush_ns = ubm_now_ns();
	m->busy_depth = cfg->busy_depth && cfg->busy_depth < m->copy_depth ? cfg->busy_depth
									    : m->copy_depth;
	m->chunk = calloc(m->nr_chunks, sizeof(*m->chunk));
	m->dirty = calloc((m->nr_chunks + 63) / 64, sizeof(*m->dirty));
	m->dest_written = calloc((m->nr_chunks + 63) / 64, sizeof(*m->dest_written));
	m->unflushed = calloc((m->nr_chunks + 63) / 64, sizeof(*m->unflushed));
	m->hot = calloc(m->nr_chunks, 1);
	m->newest = calloc(m->nr_chunks, 1);
	m->cq.ios = calloc(m->copy_depth, sizeof(*m->cq.ios));
	m->cq.bell_fd = -1;
	if (cfg->delta_path) {
		m->delta_path = strdup(cfg->delta_path);
	} else if (asprintf(&m->delta_path, "%s.ublkmig-delta", t->source_path) < 0) {
		m->delta_path = NULL;
	}
	ret = (!m->chunk || !m->dirty || !m->dest_written || !m->unflushed || !m->hot ||
	       !m->newest || !m->cq.ios || !m->delta_path)
		? ubm_fail(ENOMEM, "out of memory") : 0;
	for (unsigned i = 0; ret == 0 && i < m->copy_depth; i++) {
		if (posix_memalign(&m->slots[i].buf, 4096, m->chunk_size) ||
		    (m->check_below && posix_memalign(&m->slots[i].check_buf, 4096, m->chunk_size)))
			ret = ubm_fail(ENOMEM, "out of memory for copy buffers");
	}
	/* the copier's own ring, with the same file slots as the queues' */
	m->cq.tgt = t;
	m->cq.depth = m->copy_depth;
	m->cq.path = UBM_PATH_COPY;
	m->cq.be_done = copier_be_done;
	if (ret == 0)
		ret = ubm_queue_ring_init(&m->cq, m->copy_depth * 4, -1, false, false);
	/* per-ring backend state (NBD: a connection for each queue and the copier) */
	for (unsigned i = 0; ret == 0 && dest->ops->attach && i <= t->nr_queues; i++)
		ret = dest->ops->attach(dest, i < t->nr_queues ? &t->queues[i] : &m->cq, SLOT_DEST);
	if (ret == 0)
		ret = install(m, SLOT_DEST, dest);
	if (ret == 0 && cfg->mode == UBM_MIG_SNAPSHOT) {
		char path[PATH_MAX];

		/* the map before the first delta: a delta without a map is
		 * garbage, a map without its delta fails a recovery (closed) */
		snprintf(path, sizeof(path), "%s.map", m->delta_path);
		ret = ubm_layer_map_create(&m->map, path, m->size, m->chunk_size);
		m->map_open = true;
		if (ret == 0 && (ret = sync_dir_of(path)) < 0)
			ret = ubm_fail(-ret, "cannot sync the folder of %s: %s", path, strerror(-ret));
		if (ret == 0)
			ret = open_delta(m, 1);
		m->gen = 1;
	}
	if (ret < 0) {
		m->deltas_done = true;  /* nothing the guest wrote is in them yet */
		for (unsigned slot = SLOT_DEST; slot < UBM_MAX_BACKENDS; slot++) {
			t->be[slot] = NULL;
			ubm_target_set_file(t, slot, -1);
		}
		mig_free(m);
		dest->ops->close(dest);
		return ret;
	}
	t->be[SLOT_DEST] = dest;
	pthread_mutex_lock(&t->mig_lock);
	A_STORE(&t->mig, m);
	pthread_mutex_unlock(&t->mig_lock);
	/* Writes routed before the migration hold no chunk references: the
	 * copier would not wait for them.  Once every queue routes through the
	 * migration, wait for those to finish before anything is copied. */
	ubm_target_sync(t);
	for (unsigned i = 0; i < t->nr_queues; i++) {
		struct ubm_queue *q = &t->queues[i];

		while (__atomic_load_n(&q->plain_inflight, __ATOMIC_ACQUIRE)) {
			if (!q->dev) {  /* a simulator: its caller drives it */
				io_uring_submit(&q->ring);
				ubm_queue_reap(q);
			}
			usleep(50);
		}
	}
	return 0;
}

UBM_EXPORT int ubm_mig_new_delta(struct ubm_target *t)
{
	struct ubm_migration *m = t->mig;
	unsigned next;
	int ret;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (A_LOAD(&m->mode) != UBM_MIG_SNAPSHOT)
		return ubm_fail(EINVAL, "not a snapshot migration");
	next = m->gen + 1;
	if (next > UBM_MAX_DELTAS)
		return ubm_fail(ENOSPC, "all %d deltas are in use", UBM_MAX_DELTAS);
	ret = open_delta(m, next);  /* before the pause: keep it short */
	if (ret < 0)
		return ret;
	/* writes routed to the old delta must be done before any write can
	 * copy a chunk from it into the new one */
	ubm_mig_pause(t);
	A_STORE(&m->gen, next);
	A_STORE(&m->delta_chunks, 0);
	return ubm_mig_resume(t);
}

UBM_EXPORT int ubm_mig_set_mode(struct ubm_target *t, uint32_t mode)
{
	if (!t->mig)
		return ubm_fail(ENOENT, "no migration is running");
	if (mode > UBM_MIG_DBT || A_LOAD(&t->mig->mode) == UBM_MIG_SNAPSHOT)
		return ubm_fail(EINVAL, "only mirror and dirty tracking switch modes");
	A_STORE(&t->mig->mode, mode);
	return 0;
}

UBM_EXPORT int ubm_mig_set_speed(struct ubm_target *t, uint64_t bytes_per_second)
{
	struct ubm_migration *m;

	pthread_mutex_lock(&t->mig_lock);
	m = t->mig;
	if (m)
		A_STORE(&m->speed, bytes_per_second);
	pthread_mutex_unlock(&t->mig_lock);
	return m ? 0 : ubm_fail(ENOENT, "no migration is running");
}

UBM_EXPORT int ubm_mig_abort(struct ubm_target *t)
{
	struct ubm_migration *m;

	pthread_mutex_lock(&t->mig_lock);
	m = t->mig;
	if (m)
		A_STORE(&m->abort, 1);
	pthread_mutex_unlock(&t->mig_lock);
	return m ? 0 : ubm_fail(ENOENT, "no migration is running");
}

UBM_EXPORT int ubm_mig_pause(struct ubm_target *t)
{
	struct ubm_migration *m = t->mig;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	m->pause_start_ns = ubm_now_ns();
	__atomic_store_n(&m->paused, 1, __ATOMIC_SEQ_CST);
	wait_inflight(m);
	return 0;
}

UBM_EXPORT int ubm_mig_resume(struct ubm_target *t)
{
	struct ubm_migration *m = t->mig;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (!A_LOAD(&m->paused))
		return 0;
	__atomic_store_n(&m->paused, 0, __ATOMIC_SEQ_CST);
	A_STORE(&m->last_pause_ns, ubm_now_ns() - m->pause_start_ns);
	ubm_target_ring_bells(t, ACT_RETRY_PARKED);
	return 0;
}

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
static int flush_dest(struct ubm_migration *m)
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
	struct ubm_migration *m = t->mig;
	int ret;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (A_LOAD(&m->cut_over))
		return ubm_fail(EINVAL, "the migration has cut over already");
	if (A_LOAD(&m->mode) != UBM_MIG_MIRROR && !A_LOAD(&m->paused))
		return ubm_fail(EAGAIN, "not in sync: dirty tracking needs a pause to cut over");
	ret = not_in_sync(m);
	if (ret < 0)
		return ret;
	/* before the hold, to keep it short */
	ret = flush_dest(m);
	if (ret < 0)
		return ubm_fail(-ret, "flushing the destination failed: %s", strerror(-ret));
	m->hold_start_ns = ubm_now_ns();
	if (!A_LOAD(&m->paused)) {
		/* a pause of its own (ubm_mig_pause's flag; its length is the
		 * cutover pause, not last_pause_ns) */
		A_STORE(&m->held, 1);
		__atomic_store_n(&m->paused, 1, __ATOMIC_SEQ_CST);
		wait_inflight(m);
	}
	/* nothing in flight now: what failed on the destination is recorded */
	ret = not_in_sync(m);
	if (ret < 0)
		ubm_mig_cutover_switch(t, 0);
	return ret;
}

UBM_EXPORT int ubm_mig_cutover_switch(struct ubm_target *t, uint32_t commit)
{
	struct ubm_migration *m = t->mig;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
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

UBM_EXPORT int ubm_mig_finish(struct ubm_target *t)
{
	struct ubm_migration *m = t->mig;
	bool cut_over;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	cut_over = A_LOAD(&m->cut_over);
	if (!cut_over && A_LOAD(&m->mode) == UBM_MIG_SNAPSHOT) {
		/* the guest's writes since the start live in the deltas: fold
		 * them back into the source, newest layer of each chunk, with
		 * guest I/O paused; on failure keep serving through the layers */
		uint64_t folded[FOLD_BATCH];
		unsigned nfolded = 0;
		int ret = 0;

		ubm_mig_pause(t);
		for (uint64_t c = 0; c <= m->nr_chunks && ret == 0; c++) {
			unsigned g = c < m->nr_chunks ? A_LOAD(&m->newest[c]) : 0;

			/* free the folded chunks' room in every delta (the source may
			 * need it: their filesystem may be full), once the source holds
			 * them durably: until then the deltas and the map are the
			 * guest's data, should the daemon die */
			if (nfolded == FOLD_BATCH || (c == m->nr_chunks && nfolded)) {
				if (fdatasync(t->source.fd) < 0) {
					ret = -errno;
					break;
				}
				/* ... and the map says so (generation 0: the source),
				 * durably: a fold-back after a crash must not copy a
				 * punched chunk over the source.  A map that failed
				 * (what failed the deltas, maybe) cannot say so: then
				 * the chunks stay in the deltas too */
				int mret = 0;

				for (unsigned i = 0; i < nfolded && mret == 0; i++)
					mret = ubm_layer_map_add(&m->map, folded[i], 0);
				if (mret == 0)
					mret = ubm_layer_map_commit(&m->map,
								    ubm_layer_map_mark(&m->map), NULL, 0);
				for (unsigned i = 0; mret == 0 && i < nfolded; i++) {
					for (unsigned d = 0; d < A_LOAD(&m->gen); d++)
						fallocate(m->delta[d].fd,
							  FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
							  (off_t)(folded[i] << m->chunk_shift),
							  chunk_len(m, folded[i]));
				}
				nfolded = 0;
			}
			if (!g)
				continue;
			if (cow_len < m->chunk_size) {
				free(cow_buf);
				cow_len = posix_memalign(&cow_buf, 4096, m->chunk_size) ? 0
											 : m->chunk_size;
			}
			ret = cow_len ? copy_range(m->delta[g - 1].fd, t->source.fd,
						   c << m->chunk_shift, chunk_len(m, c), cow_buf)
				      : -ENOMEM;
			if (ret < 0)
				break;
			A_STORE(&m->newest[c], 0);
			folded[nfolded++] = c;
		}
		if (ret == 0 && fdatasync(t->source.fd) < 0)
			ret = -errno;
		if (ret == 0)
			m->deltas_done = true;  /* the source holds it all, durably */
		if (ret < 0) {
			/* serve on through the layers; writes no longer wait for a
			 * fold-back that cannot happen (they fail as they would) */
			A_STORE(&m->delta_failed, DELTA_UNFOLDABLE);
			ubm_mig_resume(t);
			return ubm_fail(ret, "folding the deltas back into the source failed: %s",
					strerror(-ret));
		}
	}
	pthread_mutex_lock(&t->mig_lock);
	__atomic_store_n(&t->mig, NULL, __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&t->mig_lock);
	if (A_LOAD(&m->paused)) {
		__atomic_store_n(&m->paused, 0, __ATOMIC_SEQ_CST);
		A_STORE(&m->last_pause_ns, ubm_now_ns() - m->pause_start_ns);
	}
	/* requests parked by the migration are routed again without it */
	ubm_target_ring_bells(t, ACT_RETRY_PARKED);
	/* no queue is inside ubm_mig_route() any more ... */
	ubm_target_sync(t);
	/* ... and the requests it routed are done */
	wait_inflight(m);
	for (unsigned slot = cut_over ? SLOT_DELTA0 : SLOT_DEST; slot < UBM_MAX_BACKENDS; slot++) {
		if (!t->be[slot])
			continue;
		/* cancelled or failed: the source stays; let go of the rest */
		t->be[slot] = NULL;
		ubm_target_set_file(t, slot, -1);
	}
	if (!cut_over)
		t->dest.ops->close(&t->dest);
	else
		m->deltas_done = true;  /* the destination is the disk (its record is durable) */
	mig_free(m);
	return 0;
}

UBM_EXPORT int ubm_mig_verify(struct ubm_target *t, uint64_t *mismatched)
{
	struct ubm_migration *m = t->mig;
	void *a = NULL, *b = NULL;
	int ret = 0;

	*mismatched = 0;
	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (!A_LOAD(&m->paused) && !A_LOAD(&m->cut_over))
		return ubm_fail(EAGAIN, "verifying needs guest I/O paused");
	if (posix_memalign(&a, 4096, m->chunk_size) || posix_memalign(&b, 4096, m->chunk_size)) {
		free(a);
		return ubm_fail(ENOMEM, "out of memory");
	}
	for (uint64_t c = 0; c < m->nr_chunks && ret == 0; c++) {
		uint64_t off = c << m->chunk_shift;
		uint32_t len = chunk_len(m, c);
		int from = m->t->be[m->gen ? layer_slot(m, c) : SLOT_SOURCE]->fd;

		int r;

		if (pread(from, a, len, (off_t)off) != (ssize_t)len)
			ret = ubm_fail(errno ? errno : EIO, "reading chunk %llu failed",
				       (unsigned long long)c);
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

UBM_EXPORT int ubm_mig_reconnect(struct ubm_target *t)
{
	struct ubm_migration *m = t->mig;
	int ret;

	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (A_LOAD(&m->cut_over))
		return ubm_fail(EINVAL, "the migration has cut over already");
	if (!t->dest.ops->reconnect)
		return ubm_fail(EOPNOTSUPP, "the destination has no connections to restore");
	ret = t->dest.ops->reconnect(&t->dest);
	if (ret < 0)
		return ret;
	/* What the destination acknowledged since its last successful flush is
	 * not trusted: its server may have lost it with the connection (a
	 * write-back cache, a restart).  Those chunks are copied again; a
	 * chunk not copied yet will be, in full (dest_written keeps it from
	 * being skipped as zeroes). */
	for (uint64_t c = 0; c < m->nr_chunks; c++) {
		if (!bit_test(m->unflushed, c))
			continue;
		__atomic_fetch_and(&m->unflushed[c / 64], ~(1ull << (c % 64)), __ATOMIC_SEQ_CST);
		bit_set(m->dest_written, c);
		if (A_LOAD(&m->chunk[c]) & CH_COPIED)
			mark_dirty(m, c);
	}
	/* Requests routed until now that fail (on the lost connections, which
	 * they may still find dead) are old news: the chunks they touch go
	 * dirty, and that is all.  Those routed from now on find the new
	 * connections.  What the lost connections failed is dirty (or not
	 * copied): the error can go. */
	A_ADD(&m->epoch, 1);
	__atomic_store_n(&m->error, 0, __ATOMIC_SEQ_CST);
	return 0;
}

UBM_EXPORT int ubm_mig_get_stats(struct ubm_target *t, struct ubm_mig_stats *out)
{
	struct ubm_migration *m;

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&t->mig_lock);
	m = t->mig;
	if (!m) {
		pthread_mutex_unlock(&t->mig_lock);
		return ubm_fail(ENOENT, "no migration is running");
	}
	out->size = m->size;
	out->chunk_size = m->chunk_size;
	out->nr_chunks = m->nr_chunks;
	out->chunks_copied = A_LOAD(&m->chunks_copied);
	out->cursor = A_LOAD(&m->cursor);
	out->dirty_chunks = A_LOAD(&m->dirty_count);
	out->hot_chunks = A_LOAD(&m->hot_count);
	out->bytes_copied = A_LOAD(&m->bytes_copied);
	out->bytes_skipped = A_LOAD(&m->bytes_skipped);
	out->bytes_read = A_LOAD(&m->bytes_read);
	out->passes = A_LOAD(&m->passes);
	out->mirrored_writes = A_LOAD(&m->mirrored_writes);
	out->tracked_writes = A_LOAD(&m->tracked_writes);
	out->parked = A_LOAD(&m->parked);
	out->dest_errors = A_LOAD(&m->dest_errors);
	out->max_latency_ns = A_LOAD(&m->max_latency_ns);
	out->cutover_latency_ns = A_LOAD(&m->cutover_latency_ns);
	out->last_pause_ns = A_LOAD(&m->last_pause_ns);
	out->error = A_LOAD(&m->error);
	out->mode = A_LOAD(&m->mode);
	out->paused = A_LOAD(&m->paused);
	out->cut_over = A_LOAD(&m->cut_over);
	out->generation = A_LOAD(&m->gen);
	out->delta_chunks = A_LOAD(&m->delta_chunks);
	out->cow_chunks = A_LOAD(&m->cow_chunks);
	out->delta_failed = A_LOAD(&m->delta_failed);
	out->dest_down = t->dest.ops->down ? t->dest.ops->down(&t->dest) : 0;
	out->mirror_waits = A_LOAD(&m->mirror_waits);
	out->mirror_wait_ns = A_LOAD(&m->mirror_wait_ns);
	out->bytes_matched = A_LOAD(&m->bytes_matched);
	out->yield_ns = A_LOAD(&m->yield_ns);
	out->cutover_pause_ns = A_LOAD(&m->cutover_pause_ns);
	{
		/* (two loads, not one snapshot: a mean that is off by a write at most) */
		uint64_t n = A_LOAD(&m->dest_waiting), since = A_LOAD(&m->dest_waiting_since);
		uint64_t now = ubm_now_ns();

		out->dest_waiting = n;
		out->dest_waiting_ns = n && since / n < now ? now - since / n : 0;
	}
	pthread_mutex_unlock(&t->mig_lock);
	return 0;
}

/* ---- the copier ------------------------------------------------------------------ */

static uint32_t chunk_len(struct ubm_migration *m, uint64_t c)
{
	uint64_t off = c << m->chunk_shift;

	return (uint32_t)(m->size - off < m->chunk_size ? m->size - off : m->chunk_size);
}

static bool wanted(struct ubm_migration *m, uint64_t c, uint32_t pass)
{
	/* snapshot: the active delta is still taking writes */
	if (pass != UBM_PASS_FINAL && m->gen && A_LOAD(&m->newest[c]) == A_LOAD(&m->gen))
		return false;
	switch (pass) {
	case UBM_PASS_DIRTY:
		return is_dirty(m, c) && m->hot[c] < HOT_PASSES;
	default:
		return !(A_LOAD(&m->chunk[c]) & CH_COPIED) || is_dirty(m, c);
	}
}

static void unlock_chunk(struct ubm_migration *m, uint64_t c, bool copied)
{
	uint32_t s = A_LOAD(&m->chunk[c]), n;

	do {
		n = (s & ~(CH_LOCKED | CH_WAITERS)) | (copied ? CH_COPIED : 0);
	} while (!__atomic_compare_exchange_n(&m->chunk[c], &s, n, false, __ATOMIC_SEQ_CST,
					      __ATOMIC_SEQ_CST));
	if (copied && !(s & CH_COPIED))
		A_ADD(&m->chunks_copied, 1);
	if (s & CH_WAITERS)
		ubm_target_ring_bells(m->t, ACT_RETRY_PARKED);
}

static bool all_zero(const void *buf, size_t len)
{
	const uint64_t *p = buf;

	for (size_t i = 0; i < len / 8; i++)
		if (p[i])
			return false;
	return true;
}

/* A copy step failed: the chunk stays (or goes) dirty, the slot is free. */
static int copy_failed(struct ubm_migration *m, unsigned i, int err)
{
	struct copy_slot *cs = &m->slots[i];

	set_error(m, err);
	unlock_chunk(m, cs->chunk, false);
	mark_dirty(m, cs->chunk);
	cs->state = CS_FREE;
	return err;
}

/* Queue a backend operation on the copier's ring for slot i (reads of the
 * destination while checking land in the slot's check buffer). */
static int copy_op(struct ubm_migration *m, unsigned i, unsigned be_slot, uint8_t op, int state)
{
	struct copy_slot *cs = &m->slots[i];
	struct ubm_io *io = &m->cq.ios[i];
	struct ubm_backend *be = m->t->be[be_slot];
	int ret;

	io->req = (struct ubm_req){
		.op = op, .offset = cs->chunk << m->chunk_shift, .len = chunk_len(m, cs->chunk),
		.buf = state == CS_CHECKING ? cs->check_buf : cs->buf, .buf_index = -1,
	};
	cs->state = state;
	if (be_slot == SLOT_DEST && op != UBLK_IO_OP_READ)
		bit_set(m->dest_written, cs->chunk);  /* even if the write fails half-way */
	ret = be->ops->queue_io(be, &m->cq, i, be_slot, &io->req);
	return ret < 0 ? copy_failed(m, i, ret) : 0;
}

/* The chunk in slot i is locked and idle on the guest side: start copying. */
static int copy_begin(struct ubm_migration *m, unsigned i)
{
	struct copy_slot *cs = &m->slots[i];
	uint64_t off = cs->chunk << m->chunk_shift;
	uint32_t len = chunk_len(m, cs->chunk);
	off_t data;

	/* clear before reading: a write that lands after this re-dirties it */
	clear_dirty(m, cs->chunk);
	cs->first_copy = !(A_LOAD(&m->chunk[cs->chunk]) & CH_COPIED);
	/* a mirrored write may have reached the destination's chunk before the
	 * copier (it is locked now: no other can come) */
	cs->fresh = m->dest_zeroed && cs->first_copy && !bit_test(m->dest_written, cs->chunk);
	cs->check = cs->first_copy && cs->chunk < m->check_below;
	cs->from = m->gen ? layer_slot(m, cs->chunk) : SLOT_SOURCE;
	data = lseek(m->t->be[cs->from]->fd, (off_t)off, SEEK_DATA);
	if ((data < 0 && errno == ENXIO) || (data >= 0 && (uint64_t)data >= off + len)) {
		/* a hole in the source */
		if (cs->fresh) {
			A_ADD(&m->bytes_skipped, len);
			unlock_chunk(m, cs->chunk, true);
			cs->state = CS_FREE;
			return 0;
		}
		cs->zero = true;
		if (cs->check)
			return copy_op(m, i, SLOT_DEST, UBLK_IO_OP_READ, CS_CHECKING);
		return copy_op(m, i, SLOT_DEST, UBLK_IO_OP_WRITE_ZEROES, CS_WRITING);
	}
	return copy_op(m, i, cs->from, UBLK_IO_OP_READ, CS_READING);
}

/* Write slot i's chunk (read from the source, or a hole) to the destination. */
static int copy_write(struct ubm_migration *m, unsigned i)
{
	struct copy_slot *cs = &m->slots[i];

	return copy_op(m, i, SLOT_DEST, cs->zero ? UBLK_IO_OP_WRITE_ZEROES : UBLK_IO_OP_WRITE,
		       CS_WRITING);
}

/* A backend operation of copy slot i ended with cqe_res. */
static int copy_result(struct ubm_migration *m, unsigned i, unsigned be_slot, int cqe_res)
{
	struct copy_slot *cs = &m->slots[i];
	struct ubm_io *io = &m->cq.ios[i];
	struct ubm_backend *be = m->t->be[be_slot];
	int res = 0;

	if (be->ops->complete(be, &m->cq, i, be_slot, &io->req, cqe_res, &res))
		return 0;
	if (res < 0)
		return copy_failed(m, i, res);
	if (cs->state == CS_READING) {
		/* while the guest is busy, the next source read waits as long as
		 * this one took (from the lock): the guest has the source at
		 * least half the time */
		uint64_t now = ubm_now_ns(), resume = now + (now - cs->t_start);

		if (resume > m->busy_resume_ns)
			m->busy_resume_ns = resume;
		A_ADD(&m->bytes_read, io->req.len);
		cs->zero = all_zero(cs->buf, io->req.len);
		if (cs->zero && cs->fresh) {
			A_ADD(&m->bytes_skipped, io->req.len);
			unlock_chunk(m, cs->chunk, true);
			cs->state = CS_FREE;
			return 0;
		}
		if (cs->check)
			return copy_op(m, i, SLOT_DEST, UBLK_IO_OP_READ, CS_CHECKING);
		return copy_write(m, i);
	}
	if (cs->state == CS_CHECKING) {
		/* the chunk is locked: neither side changed since the source was read */
		if (cs->zero ? all_zero(cs->check_buf, io->req.len)
			     : !memcmp(cs->buf, cs->check_buf, io->req.len)) {
			A_ADD(&m->bytes_matched, io->req.len);
			unlock_chunk(m, cs->chunk, true);
			cs->state = CS_FREE;
			return 0;
		}
		return copy_write(m, i);
	}
	A_ADD(&m->bytes_copied, io->req.len);
	bit_set(m->unflushed, cs->chunk);
	unlock_chunk(m, cs->chunk, true);
	cs->state = CS_FREE;
	return 0;
}

/* q->be_done of the copier's ring (a failure is in m->error) */
static void copier_be_done(struct ubm_queue *q, unsigned tag, unsigned slot, int res)
{
	copy_result((struct ubm_migration *)((char *)q - offsetof(struct ubm_migration, cq)), tag,
		    slot, res);
}

/*
 * The speed limit, a token bucket: a pass may have copied speed x (time since
 * *origin) bytes.  Credit saved while the copier was held up (guest writes on
 * its chunks, a busy machine) is capped at a tenth of a second's worth (at
 * least the chunks in flight): a copier that fell behind does not then burst
 * to catch up with the average, and a new speed applies from now on.
 */
static bool within_speed(struct ubm_migration *m, double *origin, uint64_t pass_bytes)
{
	double speed = (double)A_LOAD(&m->speed), now, credit, cap;

	if (speed == 0)
		return true;
	now = (double)ubm_now_ns() / 1e9;
	credit = speed * (now - *origin) - (double)pass_bytes;
	cap = speed / 10;
	if (cap < (double)(m->chunk_size * m->copy_depth))
		cap = (double)(m->chunk_size * m->copy_depth);
	if (credit > cap) {
		*origin = now - ((double)pass_bytes + cap) / speed;
		credit = cap;
	}
	return credit >= 0;
}

/* The copier starts (since == 0) or stops holding back for guest I/O: the
 * new start time, or 0 once the time held is added up. */
static uint64_t account_yield(struct ubm_migration *m, uint64_t since)
{
	uint64_t now = ubm_now_ns();

	if (!since)
		return now;
	A_ADD(&m->yield_ns, now - since);
	return 0;
}

UBM_EXPORT int ubm_mig_copy_pass(struct ubm_target *t, uint32_t pass, uint64_t *chunks)
{
	struct ubm_migration *m = t->mig;
	uint64_t next = 0, copied = 0, pass_bytes = 0, yield_since = 0;
	double origin = (double)ubm_now_ns() / 1e9;  /* the speed limit's clock, in seconds */
	unsigned busy = 0, locking, i;
	int ret = 0, r;

	*chunks = 0;
	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (pass > UBM_PASS_FINAL)
		return ubm_fail(EINVAL, "unknown pass %u", pass);
	if (A_LOAD(&m->cut_over))
		return ubm_fail(EINVAL, "the migration has cut over already");
	/* (an abort stays: every later pass of this migration stops at once) */
	if (pass == UBM_PASS_DIRTY) {
		/* chunks dirty again since the last dirty pass are getting hot */
		uint64_t hot = 0;

		for (uint64_t c = 0; c < m->nr_chunks; c++) {
			if (!is_dirty(m, c))
				m->hot[c] = 0;
			else if (m->hot[c] >= HOT_PASSES)
				hot++;
		}
		A_STORE(&m->hot_count, hot);
	}
	for (;;) {
		bool stop;

		if (t->dest.ops->reconnect && !A_LOAD(&m->error) &&
		    ubm_now_ns() - m->last_flush_ns > FLUSH_INTERVAL_NS) {
			m->last_flush_ns = ubm_now_ns();
			r = flush_dest(m);
			if (r < 0)
				set_error(m, r);
		}
		stop = ret < 0 || A_LOAD(&m->abort) || A_LOAD(&m->error);
		/* the copier yields the source to the guest: while guest requests
		 * are in flight it reads at most busy_depth chunks at a time and
		 * rests after each read as long as it took (copy_result); writes
		 * to the destination stay pipelined */
		unsigned limit = A_LOAD(&m->inflight) ? m->busy_depth : m->copy_depth;
		bool resting = limit < m->copy_depth && ubm_now_ns() < m->busy_resume_ns;
		bool held = false;
		unsigned reading = 0;

		for (i = 0; i < m->copy_depth; i++)
			reading += m->slots[i].state == CS_LOCKING || m->slots[i].state == CS_READING;

		/* fill free slots with the next chunks of this pass */
		for (i = 0; i < m->copy_depth && !stop; i++) {
			struct copy_slot *cs = &m->slots[i];

			if (cs->state != CS_FREE)
				continue;
			if (!within_speed(m, &origin, pass_bytes))
				break;  /* over the speed limit: wait for time to pass */
			while (next < m->nr_chunks && !wanted(m, next, pass))
				next++;
			if (next >= m->nr_chunks)
				break;
			if (reading >= limit || resting) {
				held = true;
				break;
			}
			cs->chunk = next++;
			cs->state = CS_LOCKING;
			cs->t_start = ubm_now_ns();
			reading++;
			if (pass == UBM_PASS_DIRTY)
				m->hot[cs->chunk]++;
			__atomic_fetch_or(&m->chunk[cs->chunk], CH_LOCKED, __ATOMIC_SEQ_CST);
			pass_bytes += chunk_len(m, cs->chunk);
			busy++;
			copied++;
		}
		A_STORE(&m->cursor, next);
		if (held != (yield_since != 0))
			yield_since = account_yield(m, yield_since);
		/* locked chunks whose guest writes have drained can be read */
		locking = 0;
		for (i = 0; i < m->copy_depth; i++) {
			struct copy_slot *cs = &m->slots[i];

			if (cs->state != CS_LOCKING)
				continue;
			if (stop) {
				unlock_chunk(m, cs->chunk, false);
				cs->state = CS_FREE;
				busy--;
				continue;
			}
			if (A_LOAD(&m->chunk[cs->chunk]) & CH_COUNT) {
				locking++;
				continue;
			}
			r = copy_begin(m, i);
			if (r < 0 && ret == 0)
				ret = r;
			if (cs->state == CS_FREE)
				busy--;
		}
		if (busy == 0 && (stop || next >= m->nr_chunks))
			break;
		if (busy == 0 || locking == busy) {
			/* nothing on the ring: waiting for guest writes or the speed limit */
			usleep(locking ? 20 : 1000);
			continue;
		}
		io_uring_submit_and_wait(&m->cq.ring, 1);
		struct io_uring_cqe *cqe;
		unsigned head, n = 0;

		io_uring_for_each_cqe(&m->cq.ring, head, cqe) {
			struct ubm_backend *be = t->be[ubm_ud_slot(cqe->user_data)];

			n++;
			switch (ubm_ud_kind(cqe->user_data)) {
			case UD_BACKEND:
				r = copy_result(m, ubm_ud_tag(cqe->user_data),
						ubm_ud_slot(cqe->user_data), cqe->res);
				if (r < 0 && ret == 0)
					ret = r;
				break;
			case UD_CONN:  /* may end slots' operations (copier_be_done) */
				if (be && be->ops->conn_cqe)
					be->ops->conn_cqe(be, &m->cq, cqe);
				break;
			}
		}
		io_uring_cq_advance(&m->cq.ring, n);
		busy = 0;
		for (i = 0; i < m->copy_depth; i++)
			busy += m->slots[i].state != CS_FREE;
	}
	if (yield_since)
		account_yield(m, yield_since);
	A_ADD(&m->passes, 1);
	*chunks = copied;
	if (ret < 0 || A_LOAD(&m->error)) {
		int err = A_LOAD(&m->error) ? A_LOAD(&m->error) : ret;

		return ubm_fail(err, "copy failed: %s", strerror(-err));
	}
	if (A_LOAD(&m->abort))
		return ubm_fail(ECANCELED, "the pass was aborted");
	return 0;
}
