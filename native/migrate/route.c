/* SPDX-License-Identifier: MIT */
/*
 * The routing of guest requests while a migration runs: every rule that decides
 * where a request goes, and what its completion means for the chunks it
 * touched, is here (the router the core calls through t->router: route(),
 * part_done() as each backend's part ends, io_done() once all have).
 *
 * Where a request goes:
 * - after the cutover: the destination alone;
 * - paused (--verify before the cutover, a snapshot's new delta): parked until resumed;
 * - a read, or an empty write: the source (snapshot: each chunk's newest layer);
 * - a FLUSH: every backend holding guest data (source and destination;
 *   snapshot: every delta);
 * - a write that touches only chunks the copier has not copied yet (mirror
 *   and dbt alike): the source alone; the copier copies those chunks after it
 *   (ordering 2), so sending it to the destination too would be work done
 *   twice (VMware's rule for writes above the cursor);
 * - any other write, mirror mode: source and destination (why also to chunks
 *   not copied or dirty: at route(), below);
 * - any other write, dbt: the source; its chunks go dirty when it is done;
 * - a write, snapshot: the active delta, after its chunks were copied into it
 *   (copy on write, snapshot.c); in the tail, the destination too.
 * Whose errors the guest sees: the source's (or the delta's), never the
 * destination's before the cutover (part_done()).
 *
 * The orderings, each against a reader on another thread:
 * 1. A request counts itself in m->inflight, then looks at m->paused.  The
 *    pauser sets the flag, then waits for the count to drain: one of the two
 *    sees the other, so no request slips past a pause.
 * 2. A write takes a reference on each chunk it touches before it is sent,
 *    and drops them only when it is done; a chunk the copier has locked
 *    parks it (WAITERS: the copier rings the bells when it unlocks).  The
 *    copier reads a chunk only once its count is zero, so no write that came
 *    before the lock lands after the read.
 * 3. Mirror: a chunk's dest_written bit is set before the write is sent to
 *    the destination: the copier, waiting for this write's reference, must
 *    not take the destination's chunk for zeroes and skip it.
 * 4. A chunk goes dirty while the write still holds its references: dbt at
 *    io_done() before mig_chunks_put(), a destination failure at
 *    part_done().  A copier that waited for the count sees the bit.
 * 5. A destination failure is recorded the moment its part ends
 *    (part_done()), not when the whole request does: a mirrored write whose
 *    source part is still in flight must not look clean to a cutover
 *    meanwhile.  It counts as the migration's error only if it was routed
 *    in the current epoch (after the last ubm_mig_reconnect()).
 * 6. What the destination acknowledged goes into `unflushed` at part_done(),
 *    before the request is answered: a lost connection may lose it until a
 *    flush, and ubm_mig_reconnect() copies those chunks again.
 * 7. Snapshot: a copy on write appends its layer-map record before the
 *    write that caused it is issued; a FLUSH or FUA write takes its mark
 *    when routed and is answered only once the deltas, the records and the
 *    committed count are durable (io_done(), layermap.c).
 * 8. A mirrored write or a FLUSH whose source part is done waits for the
 *    destination alone, and counts in dest_waiting while it does
 *    (part_done()): a destination that stops answering shows in auto mode's
 *    measure before any request completes, also when the guest's requests
 *    stuck there are flushes.
 * 9. A write looks at its chunks' COPIED bits only after it holds their
 *    references: from then until it is done no copy of them can begin (the
 *    copier waits for the count) nor end (none was under way: the chunk was
 *    not locked), so a chunk not copied then is copied after the write, from
 *    a source that holds it.  Looked at before the references, a copy could
 *    end in between and the write would reach neither the copier nor the
 *    destination.
 * 10. The cutover's window (cutover.c): a failed destination part dirties
 *    its chunks (seq_cst) before io_done() loads m->switching (seq_cst); the
 *    window opens before the cutover checks for dirt.  One of the two sees
 *    the other: the cutover refuses, or the write waits for the window's end
 *    instead of being answered from the source alone while a record may say
 *    the destination is the disk.
 *
 * Where a guest request's time goes while it waits on the migration (the
 * bench's breakdown): parked on a locked chunk or a copy on write
 * (chunk_wait_ns), parked by a pause (pause_wait_ns, route()), and, mirrored,
 * waiting for the destination after the source was done (mirror_wait_ns,
 * io_done()).
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "migrate/migrate.h"

/* The migration's own state of queue q's request tag. */
static struct mig_io *mig_io(struct ubm_migration *m, const struct ubm_queue *q, unsigned tag)
{
	return &m->ios[q->q_id * m->ios_per_queue + tag];
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

/* A write to chunks c0..c1 goes to the destination too (mirror mode, or a
 * snapshot's tail). */
static void mirror_write(struct ubm_migration *m, struct ubm_io *io, struct mig_io *mi,
			 uint64_t c0, uint64_t c1)
{
	mi->flags |= MIG_IO_MIRRORED | MIG_IO_DEST_WAITS;
	/* before it is sent: the copier (waiting for this write's reference)
	 * must not take the destination's chunk for zeroes (ordering 3) */
	for (uint64_t c = c0; c <= c1; c++)
		bit_set(m->dest_written, c);
	to_slot(io, SLOT_DEST, io->req.offset, io->req.len);
}

/* A write that stays off the destination dirties its chunks when it is done
 * (io_done()), and the cutover waits for it (unmirrored). */
static void track_write(struct ubm_migration *m, struct mig_io *mi)
{
	mi->flags |= MIG_IO_TRACKED;
	A_ADD(&m->unmirrored, 1);
}

/* Snapshot routing: reads from the newest layer of each chunk, writes to
 * the active delta (after copying the chunk into it if it is not there), and
 * in the tail (snap_mirror) to the destination too, as mirror mode's go to
 * the source and the destination: the copier takes a chunk of the active
 * delta then, after the writes that hold it, so one pass converges. */
static int snapshot_route(struct ubm_migration *m, struct ubm_io *io, struct mig_io *mi,
			  uint64_t c0, uint64_t c1)
{
	const struct ubm_req *req = &io->req;
	unsigned active = A_LOAD(&m->gen), s0, s1;
	bool mirrored = A_LOAD(&m->snap_mirror);  /* read once: the COW and the routing agree */
	int ret;

	if (req->op == UBLK_IO_OP_FLUSH) {
		/* every delta holds data the guest wrote, and the layer map
		 * where: the records so far are durable before it is done */
		mi->map_mark = ubm_layer_map_mark(&m->map);
		for (unsigned g = 1; g <= active; g++)
			to_slot(io, SLOT_DELTA0 + g - 1, 0, 0);
		if (mirrored)
			to_slot(io, SLOT_DEST, 0, 0);  /* mirrored writes sit there too */
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
		ret = mig_snapshot_cow(m, c, mirrored);
		if (ret < 0) {
			mig_fail_deltas(m, ret);
			ret = 1;
		}
		if (ret)
			return ret;  /* another queue is copying it, or the deltas failed: park */
	}
	/* FUA: its chunks' records (added above, if copied now) durable too */
	mi->map_mark = ubm_layer_map_mark(&m->map);
	to_slot(io, SLOT_DELTA0 + active - 1, req->offset, req->len);
	if (mirrored)
		mirror_write(m, io, mi, c0, c1);
	else  /* (dirty when done: also a chunk the tail copied, if mirroring stopped) */
		track_write(m, mi);
	return 0;
}

/* Decide where a request goes: fills io->slots and io->sreq[].  Returns 0,
 * 1 when it must wait (park), or -errno to fail it. */
static int route(struct ubm_migration *m, struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	struct mig_io *mi = mig_io(m, q, tag);
	const struct ubm_req *req = &io->req;
	uint32_t mode = A_LOAD(&m->mode);
	uint64_t c0 = 0, c1 = 0;
	bool copied;
	int ret;

	if (!mi->t_start)
		mi->t_start = ubm_now_ns();
	if (mi->t_parked) {  /* routed again after it waited: where the time went */
		A_ADD(mi->park_why == PARK_PAUSE ? &m->pause_wait_ns : &m->chunk_wait_ns,
		      ubm_now_ns() - mi->t_parked);
		mi->t_parked = 0;
	}
	mi->epoch = A_LOAD(&m->epoch);
	mi->flags = 0;
	mi->t_source_done = 0;
	io->slots = 0;
	/* announce first, then look at the pause flag: ubm_mig_pause() sets
	 * the flag first, then waits for the count to drain */
	A_ADD(&m->inflight, 1);
	if (ubm_unlikely(A_LOAD(&m->paused)))
		goto park_pause;
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
			goto park_pause;  /* until the deltas are folded back into the source */
		if (is_write(req->op) && req->len) {
			if (!mig_chunks_get(m, c0, c1))
				goto park;
			mi->flags = MIG_IO_REFS;
		}
		ret = snapshot_route(m, io, mi, c0, c1);
		if (ret == 1) {
			mig_chunks_put(m, c0, c1);
			mi->flags = 0;
			goto park;
		}
		return ret;
	}
	if (req->op == UBLK_IO_OP_FLUSH) {
		/* durable on both: mirrored writes and copied chunks sit on the destination */
		mi->flags = MIG_IO_DEST_WAITS;
		to_slot(io, SLOT_SOURCE, 0, 0);
		to_slot(io, SLOT_DEST, 0, 0);
		return 0;
	}
	if (!is_write(req->op) || req->len == 0) {
		to_slot(io, SLOT_SOURCE, req->offset, req->len);
		return 0;
	}
	if (!mig_chunks_get(m, c0, c1))
		goto park;
	mi->flags = MIG_IO_REFS;
	to_slot(io, SLOT_SOURCE, req->offset, req->len);
	/* ahead of the copier: it copies these chunks after this write is done
	 * (the references are held: ordering 9), so the source alone */
	copied = false;
	for (uint64_t c = c0; c <= c1 && !copied; c++)
		copied = A_LOAD(&m->chunk[c]) & CH_COPIED;
	if (!copied) {
		A_ADD(&m->ahead_writes, 1);
		return 0;
	}
	/* Mirror mode mirrors every other write, also where one of its chunks
	 * is not copied yet or is dirty (a destination error, or a connection
	 * lost, left it behind): the copier copies such a chunk after this
	 * write is done (it holds a reference), so the destination ends with
	 * the source's data.  Sending a write that touches a dirty chunk to the
	 * source only would dirty its clean chunks too: under a busy guest, dirt
	 * would spread from chunk to chunk faster than the copier cleans it. */
	if (mode == UBM_MIG_MIRROR) {
		mirror_write(m, io, mi, c0, c1);
		return 0;
	}
	track_write(m, mi);  /* dbt: the copied one of its chunks must go dirty */
	return 0;
park_pause:
	mi->park_why = PARK_PAUSE;
	goto parked;
park:
	mi->park_why = PARK_CHUNK;
parked:
	mi->t_parked = ubm_now_ns();
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
static bool part_done(struct ubm_migration *m, struct ubm_queue *q, unsigned tag, unsigned slot,
		      int res)
{
	struct mig_io *mi = mig_io(m, q, tag);
	const struct ubm_req *req = &q->ios[tag].req;
	bool data = is_write(req->op) && req->len;
	uint64_t c0 = 0, c1 = 0;

	if (slot != SLOT_DEST) {  /* the source, or snapshot's active delta */
		if (mi->flags & MIG_IO_DEST_WAITS) {
			mi->t_source_done = ubm_now_ns();
			/* the guest now waits for the destination alone: counted
			 * while it does, so a destination that stops answering
			 * shows before any request completes (auto mode's
			 * fallback; ordering 8) */
			if (!(mi->flags & MIG_IO_DEST_DONE)) {
				mi->flags |= MIG_IO_WAITING;
				A_ADD(&m->dest_waiting_since, mi->t_source_done);
				A_ADD(&m->dest_waiting, 1);
			}
		}
		return true;
	}
	if (slot == SLOT_DEST) {
		mi->flags |= MIG_IO_DEST_DONE;
		if (mi->flags & MIG_IO_WAITING) {
			mi->flags &= ~MIG_IO_WAITING;
			A_SUB(&m->dest_waiting, 1);
			A_SUB(&m->dest_waiting_since, mi->t_source_done);
		}
	}
	/* after the cutover the destination is the disk: its errors are the guest's
	 * (and a delta's are: io_done() tries a snapshot write again); but a write
	 * mirrored before the switch is tried there again instead (io_done()) */
	if (slot != SLOT_DEST || (A_LOAD(&m->cut_over) && !(mi->flags & MIG_IO_MIRRORED)))
		return true;
	/* before it, a destination's error is the migration's business alone: the
	 * guest's answer comes from the source */
	if (data) {
		c0 = req->offset >> m->chunk_shift;
		c1 = (req->offset + req->len - 1) >> m->chunk_shift;
	}
	if (res >= 0) {
		/* acknowledged, not yet durable: a lost connection may lose it */
		for (uint64_t c = c0; data && c <= c1; c++)
			bit_set(m->unflushed, c);
		return false;
	}
	if (mi->flags & MIG_IO_DEST_FAILED)
		return false;
	mi->flags |= MIG_IO_DEST_FAILED;
	if (A_LOAD(&m->cut_over))
		return false;  /* (tried again on the destination: io_done()) */
	/* the source has it (or will), the destination may not */
	for (uint64_t c = c0; data && c <= c1; c++)
		mig_mark_dirty(m, c);
	mig_dest_failed(m, mi->epoch, res);
	return false;
}

static int io_done(struct ubm_migration *m, struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	struct mig_io *mi = mig_io(m, q, tag);
	const struct ubm_req *req = &io->req;
	uint64_t now = ubm_now_ns(), lat = now - mi->t_start, cut;
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
		ret = ubm_layer_map_commit(&m->map, mi->map_mark, fds, n);
		if (ret < 0)
			io->result = ret;
	}
	/* a snapshot write or flush that failed on a delta is tried again
	 * once the deltas are folded back into the source (fail_deltas) */
	bool retry = io->result < 0 && !cut_over && A_LOAD(&m->mode) == UBM_MIG_SNAPSHOT &&
		     (is_write(req->op) || req->op == UBLK_IO_OP_FLUSH) &&
		     A_LOAD(&m->delta_failed) != DELTA_UNFOLDABLE;

	if (retry)
		mig_fail_deltas(m, io->result);
	/* a mirrored write whose destination part failed in the cutover's window,
	 * or at all once it switched: the source has it, the image the record
	 * names from then on may not.  It waits for the window's end and goes
	 * again: to the destination alone after the switch (ordering 10) */
	else if ((mi->flags & MIG_IO_DEST_FAILED) &&
		 (__atomic_load_n(&m->switching, __ATOMIC_SEQ_CST) || A_LOAD(&m->cut_over)))
		retry = true;

	if (mi->flags & MIG_IO_REFS) {
		uint64_t c0 = req->offset >> m->chunk_shift;
		uint64_t c1 = (req->offset + req->len - 1) >> m->chunk_shift;

		if (mi->flags & MIG_IO_MIRRORED) {
			A_ADD(&m->mirrored_writes, 1);
			/* the source was done first: the guest waited for the destination */
			if (mi->t_source_done && now > mi->t_source_done) {
				A_ADD(&m->mirror_waits, 1);
				A_ADD(&m->mirror_wait_ns, now - mi->t_source_done);
			}
			/* (a destination failure is recorded already: part_done) */
		} else if (mi->flags & MIG_IO_TRACKED) {
			A_ADD(&m->tracked_writes, 1);
			if (io->result >= 0) {
				for (uint64_t c = c0; c <= c1; c++)
					mig_mark_dirty(m, c);
			}
			A_SUB(&m->unmirrored, 1);
		}
		/* dirty before unreferenced: a copier waiting for the count sees the bit */
		mig_chunks_put(m, c0, c1);
	}
	if (retry) {
		mi->park_why = PARK_PAUSE;  /* until the fold-back, or the window's end */
		mi->t_parked = now;
		A_SUB(&m->inflight, 1);
		A_ADD(&m->parked, 1);
		/* switched already: nothing else will ring for it (the switch's
		 * bell, if still to come, finds it parked: this thread answers it) */
		if (A_LOAD(&m->cut_over))
			ubm_queue_ring_bell(q, ACT_RETRY_PARKED);
		return 1;  /* t_start stays: the latency counts from the first try */
	}
	mig_atomic_max(&m->max_latency_ns, lat);
	cut = A_LOAD(&m->cutover_ns);
	if (cut && now + 1000000000ull > cut && now < cut + 1000000000ull)
		mig_atomic_max(&m->cutover_latency_ns, lat);
	mi->t_start = 0;
	A_SUB(&m->inflight, 1);
	return 0;
}

/* ---- the router the core calls (t->router while the migration runs) ---------- */

static struct ubm_migration *of_router(struct ubm_router *r)
{
	return (struct ubm_migration *)((char *)r - offsetof(struct ubm_migration, router));
}

static int router_route(struct ubm_router *r, struct ubm_queue *q, unsigned tag)
{
	return route(of_router(r), q, tag);
}

static bool router_part_done(struct ubm_router *r, struct ubm_queue *q, unsigned tag,
			     unsigned slot, int res)
{
	return part_done(of_router(r), q, tag, slot, res);
}

static int router_io_done(struct ubm_router *r, struct ubm_queue *q, unsigned tag)
{
	return io_done(of_router(r), q, tag);
}

const struct ubm_router_ops ubm_mig_router_ops = {
	.route = router_route,
	.part_done = router_part_done,
	.io_done = router_io_done,
};
